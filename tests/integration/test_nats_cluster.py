"""A three-node NATS cluster: the JetStream leader of ``wa_stream`` is SIGKILLed mid-run, nothing is lost or
duplicated.

The cluster is started here (three nats-server processes with routes to each other, distinct store dirs), the
streams have 3 replicas (``ingest.stream_replicas`` / ``publish.stream_replicas``) and two service replicas connect
to all three URLs. A producer task feeds events at a steady pace; a third of the way in, the node leading
``wa_stream`` is killed and feeding goes on. Every process is stopped by pid in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import redis
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.integration.helpers import DLQ, INPUT, OUTPUT
from tests.sequin import body, encode
from tests.servers import GiveUp, NatsServer, RedisServer, ServiceProcess, free_port, wait_for, wait_for_async

pytestmark = pytest.mark.integration

EVENTS = 2000
KILL_AFTER = 700
BATCH = 20
PACE = 0.05  # seconds between batches: ~400 events/s, so the run spans the kill and the leader election


def expected_id(i: int) -> str:
    return f"{i + 1}:chatdb:acme:messages:m{i}"


def start_cluster(root: Path) -> dict[str, NatsServer]:
    nodes = cluster_nodes(root)
    for node in nodes.values():
        node.start()
    return nodes


def cluster_nodes(root: Path) -> dict[str, NatsServer]:
    """Three nodes of one cluster, not started."""
    client_ports = [free_port() for _ in range(3)]
    cluster_ports = [free_port() for _ in range(3)]
    nodes: dict[str, NatsServer] = {}
    for i in range(3):
        routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports) if j != i)
        extra = ["--server_name", f"n{i + 1}", "--cluster_name", "c"]
        extra += ["--cluster", f"nats://127.0.0.1:{cluster_ports[i]}", "--routes", routes]
        nodes[f"n{i + 1}"] = NatsServer(root, client_ports[i], extra)
    return nodes


async def retrying(call: Any, timeout: float = 15.0, what: str = "JetStream call") -> Any:
    """Await ``call()`` until it succeeds: during a leader election JetStream requests time out or answer 503.
    ``NotFoundError`` is an answer, not a failure: it propagates at once."""

    async def attempt() -> tuple[Any]:
        return (await call(),)  # a tuple: a falsy result is a result too

    (result,) = await wait_for_async(attempt, timeout, 0.05, what=what, give_up_on=(NotFoundError,))
    return result


async def poll(check: Any, timeout: float, what: str) -> Any:
    """Poll the async ``check`` (errors count as not yet) until it returns something truthy."""
    return await wait_for_async(check, timeout, 0.05, what=what)


async def produce(js: JetStreamContext, fed: list[int]) -> None:
    """Feed EVENTS events in batches; each publish is retried with the same Nats-Msg-Id until acknowledged."""
    for start in range(0, EVENTS, BATCH):
        for i in range(start, min(start + BATCH, EVENTS)):
            data = encode(body(lsn=i + 1, message_id=f"m{i}"))
            headers = {"Nats-Msg-Id": f"in-{i}"}  # the input stream drops a retried publish that did land
            await retrying(lambda d=data, h=headers: js.publish("cdc.acme.messages", d, timeout=1, headers=h))
            fed.append(i)
        await asyncio.sleep(PACE)  # pacing of the producer, not a wait for anything


async def read_ids(js: JetStreamContext, stream: str) -> list[str]:
    info = await retrying(lambda: js.stream_info(stream))
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await retrying(lambda s=seq: js.get_msg(stream, s))
        except NotFoundError:
            continue
        ids.append(orjson.loads(msg.data)["event_id"])
    return ids


async def test_killing_the_stream_leader_loses_and_duplicates_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    if not redis_server.alive():
        redis_server.start()
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()

    nodes: dict[str, NatsServer] = {}
    services: list[ServiceProcess] = []
    nc: Any = None
    producer: asyncio.Task[None] | None = None
    try:
        nodes = start_cluster(tmp_path)
        urls = [n.url for n in nodes.values()]
        nc = await nats.connect(servers=urls, reconnect_time_wait=0.2, max_reconnect_attempts=-1, connect_timeout=2)
        js = nc.jetstream(timeout=2)

        # A meta leader exists once the cluster accepts a replicated stream.
        await retrying(
            lambda: js.add_stream(StreamConfig(name=INPUT, subjects=["cdc.*.*"], num_replicas=3)),
            timeout=20,
            what="creating the R3 input stream (meta leader elected)",
        )

        timings = {
            "ingest.stream_replicas": 3,
            "publish.stream_replicas": 3,
            "ingest.ack_wait": 2,
            "publish.timeout": 1,
            "dedup.claim_ttl": 1.5,
            "nats.reconnect_wait": 0.2,
        }
        for k in range(2):
            service = ServiceProcess(tmp_path, ",".join(urls), redis_server.url, name=f"svc{k}", **timings)
            service.start()
            services.append(service)
        for service in services:
            service.wait_ready(30)

        out_info = await retrying(lambda: js.stream_info(OUTPUT))
        assert out_info.config.num_replicas == 3
        assert (await retrying(lambda: js.stream_info(INPUT))).config.num_replicas == 3

        fed: list[int] = []
        producer = asyncio.create_task(produce(js, fed))
        await poll(lambda: _true(len(fed) >= KILL_AFTER or producer.done()), 20, "producer a third of the way")
        assert not producer.done() or producer.exception() is None

        leader = await poll(lambda: _leader(js, OUTPUT), 10, "wa_stream leader known")
        nodes[leader].kill()
        killed_at = len(fed)

        await asyncio.wait_for(producer, 40)
        assert len(fed) == EVENTS

        new_leader = await poll(lambda: _leader(js, OUTPUT), 15, "wa_stream new leader")
        assert new_leader != leader

        async def settled() -> bool:
            info = await js.consumer_info(INPUT, "cdc_consumers")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await poll(settled, 20, "cdc_consumers settled")
        # Acked means published; should some be missing, the id comparison below says which.
        with contextlib.suppress(TimeoutError):
            await poll(lambda: _at_least(js, OUTPUT, EVENTS), 5, f"{EVENTS} events in {OUTPUT}")

        ids = await read_ids(js, OUTPUT)
        expected = {expected_id(i) for i in range(EVENTS)}
        missing = sorted(expected - set(ids))
        duplicated = sorted({i for i in ids if ids.count(i) > 1}) if len(ids) != len(set(ids)) else []
        extra = sorted(set(ids) - expected)
        logs = "\n".join(s.output()[-3000:] for s in services)
        assert not missing, f"{len(missing)} lost, first {missing[:20]}; killed {leader} at {killed_at}\n{logs}"
        assert not duplicated, f"{len(duplicated)} duplicated, first {duplicated[:20]}; killed {leader}\n{logs}"
        assert not extra, f"unexpected events {extra[:20]}"
        assert len(ids) == EVENTS

        try:
            dead = (await retrying(lambda: js.stream_info(DLQ))).state.messages
        except NotFoundError:
            dead = 0
        assert dead == 0, f"{dead} dead letters\n{logs}"
        for service in services:
            assert service.alive(), service.output()[-3000:]
    finally:
        if producer is not None and not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
        for service in services:
            service.stop()
        if nc is not None:
            await nc.close()
        for node in nodes.values():
            node.stop()


async def test_start_up_waits_for_a_jetstream_quorum(tmp_path: Path, redis_server: RedisServer) -> None:
    """One node of three up: no meta leader, so every JetStream request times out or answers 503. The replica keeps
    retrying (alive, not ready, ``/readyz`` naming the attempt) and starts once a second node makes a quorum."""
    if not redis_server.alive():
        redis_server.start()
    nodes = cluster_nodes(tmp_path)
    service: ServiceProcess | None = None
    try:
        nodes["n1"].start()
        service = ServiceProcess(tmp_path, nodes["n1"].url, redis_server.url, **{"nats.provision_timeout": 120})
        service.start()
        running = service

        def retrying_provisioning() -> bool:
            if not running.alive():
                raise GiveUp(f"service exited: {running.output()[-3000:]}")
            status, detail = running.get("/readyz")
            return status == 503 and b"provisioning streams (attempt" in detail

        wait_for(retrying_provisioning, 60, 0.1, what="/readyz names a provisioning attempt")
        nodes["n2"].start()
        service.wait_ready(90)
        warnings = [line for line in service.logs() if line.get("message", "").startswith("provisioning: js.")]
        assert warnings and all(line["level"] == "WARNING" for line in warnings), service.output()[-3000:]
    finally:
        if service is not None:
            service.stop()
        for node in nodes.values():
            if node.proc is not None:
                node.stop()


async def _true(value: bool) -> bool:
    return value


async def _leader(js: JetStreamContext, stream: str) -> str | None:
    info = await js.stream_info(stream)
    return info.cluster.leader if info.cluster else None


async def _at_least(js: JetStreamContext, stream: str, n: int) -> bool:
    return int((await js.stream_info(stream)).state.messages) >= n
