"""No duplicate on the wire: a plain (core) NATS subscriber on ``wa.>`` sees each event once, not only ``wa_stream``.

JetStream's ``Nats-Msg-Id`` window keeps a repeated event out of the stream, but the repeat still travels on the core
subject. These tests feed the same Sequin message twice, at spacings from 0 to 20 ms, into one replica and into two,
and count what a core subscription receives per ``Nats-Msg-Id``. Further cases: a replica SIGKILL'd while it holds
claims, and a publish that fails while a second copy waits (both with a nats-server whose permissions keep a
replica's failing publishes off the wire, so every publish that reached it counts).
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import redis
from nats.aio.client import Client

from tests.integration.helpers import (
    OUTPUT,
    consumer_settled,
    count,
    ensure_input,
    payloads,
    read_all,
    wait_count,
    wait_until,
)
from tests.sequin import body
from tests.servers import NatsServer, RedisServer, ServiceProcess

pytestmark = pytest.mark.integration

SPACINGS_MS = list(range(21))  # 0, 1, ..., 20 ms between the two copies of one change


class WireTap:
    """A core subscription on ``wa.>`` counting every message it receives by ``Nats-Msg-Id``."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self._nc: Client | None = None

    async def start(self, nc: Client, subject: str = "wa.>") -> None:
        self._nc = nc

        async def on_msg(msg: Any) -> None:
            self.seen[(msg.headers or {}).get("Nats-Msg-Id", "?")] += 1

        await nc.subscribe(subject, cb=on_msg)
        await nc.flush()

    async def settle(self) -> None:
        """A PING/PONG: the server sends what it routed to us before the PONG, so everything published is counted."""
        assert self._nc is not None
        await self._nc.flush()

    def repeated(self) -> dict[str, int]:
        return {k: n for k, n in self.seen.items() if n > 1}


@pytest.fixture
async def tap(nc: Client) -> AsyncIterator[WireTap]:
    wire = WireTap()
    await wire.start(nc)
    yield wire


async def feed_pairs(js: Any, rounds: int = 1, base: int = 10_000) -> list[str]:
    """Each change twice, the copies ``spacing`` ms apart; returns the event ids in order."""
    ids = []
    for r in range(rounds):
        for spacing in SPACINGS_MS:
            lsn = base + r * 100 + spacing
            data = orjson.dumps(body(lsn=lsn, message_id=f"m{lsn}"))
            await js.publish("cdc.acme.messages", data)
            if spacing:
                await asyncio.sleep(spacing / 1000)  # the spacing under test, not a wait for something
            await js.publish("cdc.acme.messages", data)
            ids.append(f"{lsn}:chatdb:acme:messages:m{lsn}")
    return ids


async def assert_each_once(js: Any, tap: WireTap, ids: list[str], consumer: str = "cdc_consumers") -> None:
    assert await wait_count(js, OUTPUT, len(ids), timeout=30) == len(ids)
    info = await consumer_settled(js, consumer, timeout=30)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    await tap.settle()
    stored = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
    assert sorted(stored) == sorted(ids)  # each exactly once in the stream
    assert tap.repeated() == {}  # ... and on the wire
    assert set(tap.seen) == set(ids)


@pytest.mark.parametrize("mode", ["push", "pull"])
async def test_pairs_into_one_replica_reach_the_wire_once(js, tap: WireTap, start_service, mode: str) -> None:
    await ensure_input(js)
    overrides: dict[str, Any] = {"ingest.mode": "pull", "ingest.durable": "cdc_pull"} if mode == "pull" else {}
    svc = start_service(**overrides)
    ids = await feed_pairs(js, rounds=2)
    await assert_each_once(js, tap, ids, "cdc_pull" if mode == "pull" else "cdc_consumers")
    handled = svc.metric("cdc_consumer_events_total", {"table": "messages"})
    assert handled == 2 * len(ids)
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "duplicate"}) == len(ids)


async def test_pairs_into_two_replicas_reach_the_wire_once(js, tap: WireTap, start_service) -> None:
    await ensure_input(js)
    replicas = [start_service(wait=False, name=f"r{i}") for i in range(2)]
    for replica in replicas:
        replica.wait_ready()
    ids = await feed_pairs(js, rounds=4)
    await assert_each_once(js, tap, ids)
    published = sum(
        r.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) for r in replicas
    )
    assert published == len(ids)
    assert all(r.metric("cdc_consumer_events_total", {"table": "messages"}) > 0 for r in replicas)


# ---------------------------------------------------------------------------------------------------------------
# A replica killed while it holds claims, and a publish that fails while a second copy waits. The nats-server denies
# the failing publishes (a permissions violation), so they never reach a subscriber: every publish the tap counts
# is one the server routed.

DENY_ALL = '["wa.>"]'
USERS = """authorization {{
  users = [
    {{user: svc, password: svc-pw, permissions: {{publish: {{allow: [">"], deny: {svc_deny}}}}}}}
    {{user: stuck, password: stuck-pw, permissions: {{publish: {{allow: [">"], deny: ["wa.>"]}}}}}}
    {{user: test, password: test-pw}}
  ]
}}
"""
SHORT = {
    "ingest.ack_wait": 6,
    "ingest.max_deliver": 10,
    "publish.timeout": 1,
    "dedup.claim_ttl": 3,
    "publish.retry_initial": 0.1,
    "publish.retry_max": 0.3,
}


class Permissioned:
    """A nats-server of our own with users whose publish permissions the test changes with a config reload."""

    def __init__(self, tmp: Path, redis_url: str) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.conf = tmp / "nats-perm.conf"
        self.write("[]")
        self.server = NatsServer(tmp, extra=["-c", str(self.conf)])
        self.services: list[ServiceProcess] = []

    def write(self, svc_deny: str) -> None:
        self.conf.write_text(USERS.format(svc_deny=svc_deny))

    def reload(self, svc_deny: str) -> None:
        self.write(svc_deny)
        self.server.signal(signal.SIGHUP)

    def service(self, user: str, name: str, **overrides: Any) -> ServiceProcess:
        creds = {"nats.user": user, "nats.password": f"{user}-pw"}
        svc = ServiceProcess(self.tmp, self.server.url, self.redis_url, name=name, **creds, **SHORT, **overrides)
        self.services.append(svc)
        svc.start()
        return svc

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()
        self.server.stop()


@pytest.fixture
async def perm(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[tuple[Permissioned, Any, WireTap]]:
    if not redis_server.alive():
        redis_server.start()
    r = redis.Redis.from_url(redis_server.url)
    r.flushall()
    r.close()
    stack = Permissioned(tmp_path, redis_server.url)
    stack.server.start()
    client = await nats.connect(stack.server.url, user="test", password="test-pw")
    wire = WireTap()
    await wire.start(client)
    try:
        js = client.jetstream()
        await ensure_input(js)
        yield stack, js, wire
    finally:
        await client.close()
        stack.stop()


def claims_held(client: redis.Redis) -> int:
    return sum(1 for key in client.scan_iter("dedup:*") if (client.get(key) or b"").startswith(b"claim:"))


async def test_a_replica_killed_holding_claims_loses_and_repeats_nothing(perm, redis_client) -> None:
    stack, js, tap = perm
    stuck = stack.service("stuck", "stuck")  # may not publish to wa.>: claims, then holds
    healthy = stack.service("svc", "healthy")
    stuck.wait_ready()
    healthy.wait_ready()
    docs = [body(lsn=30_000 + i, message_id=f"k{i}") for i in range(20)]
    ids = [f"{30_000 + i}:chatdb:acme:messages:k{i}" for i in range(20)]
    for doc in docs:
        await js.publish("cdc.acme.messages", orjson.dumps(doc))
    await wait_until(lambda: claims_held(redis_client) > 0, 10, "the stuck replica holding claims")
    for doc in docs:  # Sequin repeats every change; the healthy replica finds the stuck one's claims
        await js.publish("cdc.acme.messages", orjson.dumps(doc))
    held = claims_held(redis_client)
    stuck.kill()
    assert held > 0
    # The claims expire (no one releases them); the copies and, after AckWait, the redeliveries are published once.
    await assert_each_once(js, tap, ids)
    assert healthy.metric("cdc_consumer_copy_waits_total", {"holder": "other_replica"}) >= 1
    assert healthy.metric("cdc_consumer_unclaimed_publishes_total") == 0


async def test_a_publish_failing_while_a_copy_waits_is_published_once(perm) -> None:
    stack, js, tap = perm
    stack.reload('["wa.acme.agent-1.messages.chat-d"]')  # this chat's publishes fail (never reaching the wire)
    svc = stack.service("svc", "svc", **{"publish.max_hold": 2})
    svc.wait_ready()
    doc = orjson.dumps(body(lsn=40_000, message_id="d1", chat_id="chat-d"))
    await js.publish("cdc.acme.messages", doc)
    await js.publish("cdc.acme.messages", doc)  # a second copy while the first waits for its PubAck
    await wait_until(
        lambda: svc.metric("cdc_consumer_copy_waits_total", {"holder": "this_replica"}) >= 1, 10, "the copy waiting"
    )
    await wait_until(
        lambda: any(line.get("message", "").startswith("giving up the hold") for line in svc.logs()),
        15,
        "the first copy given up (nak'ed)",
    )
    assert await count(js, OUTPUT) == 0
    stack.reload("[]")  # the output heals while the copy publishes
    await assert_each_once(js, tap, ["40000:chatdb:acme:messages:d1"])
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 1
    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "retried"}) >= 1
