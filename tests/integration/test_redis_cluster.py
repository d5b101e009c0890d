"""``redis.mode = "cluster"`` against a real three-master Redis Cluster (no replicas).

Three redis-server processes with ``--cluster-enabled yes`` on free loopback ports, joined by
``redis-cli --cluster create``; the tests wait until every node reports ``cluster_state:ok``. The adapter's
batches span many hash slots, so they exercise redis-py's cross-slot cluster pipelines. Every process is stopped by
pid at teardown.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from cdc_service.adapters import redis_dedup
from cdc_service.adapters.redis_dedup import RedisDedupStore
from cdc_service.config import ConfigError, DedupSettings, RedisSettings, settings_from_mapping
from tests.integration.helpers import OUTPUT, consumer_settled, ensure_input, feed, payloads, read_all, wait_until
from tests.sequin import body
from tests.servers import RedisServer, ServiceProcess, binary, free_port, wait_for

pytestmark = pytest.mark.integration

TTL = 300


class RedisClusterNodes:
    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=2)


def _cluster_ok(port: int) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
    try:
        info = client.cluster("INFO")  # redis-py parses it into a dict of strings
    finally:
        client.close()
    return bool(
        info.get("cluster_state") == "ok"
        and info.get("cluster_slots_ok") == "16384"
        and info.get("cluster_known_nodes") == "3"
    )


def _cluster_port() -> int:
    """A free port that also leaves its cluster bus port (+10000) free; redis-server 6 wants it <= 55535."""
    for _ in range(200):
        port = random.randint(20000, 55535)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def redis_cluster(workdir: Path) -> Iterator[RedisClusterNodes]:
    cli = binary("redis-cli")
    help_text = subprocess.run([cli, "--cluster", "help"], check=False, capture_output=True, text=True, timeout=10)
    if "create" not in help_text.stdout + help_text.stderr:
        pytest.skip(f"{cli} has no --cluster support")
    ports: list[int] = []
    while len(ports) < 3:
        port = _cluster_port()
        if port not in ports:
            ports.append(port)
    nodes = []
    for port in ports:
        extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / f"nodes-{port}.conf")]
        extra += ["--cluster-node-timeout", "2000"]
        nodes.append(RedisServer(workdir, port, extra))
    try:
        for node in nodes:
            node.start()
        create = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert create.returncode == 0, create.stdout[-2000:] + create.stderr[-2000:]
        for port in ports:
            wait_for(lambda port=port: _cluster_ok(port), 30, 0.05, what=f"cluster_state:ok on {port}")
        yield RedisClusterNodes(nodes)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterNodes]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as nodes:
        yield nodes


@pytest.fixture
def cluster_client(cluster: RedisClusterNodes) -> Iterator[RedisCluster]:
    client = cluster.client()
    client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield client
    client.close()


def _store(url: str, *, retry_interval: float = 1.0) -> RedisDedupStore:
    return RedisDedupStore(
        RedisSettings(url=url, mode="cluster", socket_timeout=0.5, retry_interval=retry_interval),
        DedupSettings(ttl=TTL),
        pool_size=4,
    )


IDS = [f"{1000 + i}:chatdb:acme:messages:msg-{i}" for i in range(500)]
PROBE_KEY = DedupSettings().key_prefix + "__probe__"  # where RedisDedupStore.probe writes


def test_cluster_batch_across_slots_is_looked_up_and_marked(cluster: RedisClusterNodes, cluster_client) -> None:
    slots = {cluster_client.keyslot("dedup:" + i) for i in IDS}
    owners = {cluster_client.get_node_from_key("dedup:" + i).port for i in IDS}
    assert len(slots) > 400
    assert owners == {node.port for node in cluster.nodes}  # the batch touches all three masters
    store = _store(cluster.url)
    try:
        assert store.probe() is True
        assert store.seen(IDS) == [False] * len(IDS)
        assert store.mark(IDS) is True
        assert store.seen(IDS) == [True] * len(IDS)
        mixed = [IDS[0], "never:chatdb:acme:messages:x", IDS[-1]]
        assert store.seen(mixed) == [True, False, True]
        assert store.available is True
    finally:
        store.close()
    for event_id in (IDS[0], IDS[250], IDS[-1]):
        ttl = cluster_client.ttl("dedup:" + event_id)
        assert TTL - 5 <= ttl <= TTL
        assert cluster_client.get("dedup:" + event_id) == b""


class _Clock:
    """The store's monotonic clock, moved by hand: past ``retry_interval`` without sleeping, so that the next call
    really goes to the cluster instead of being skipped (``redis_dedup`` reads no other time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(redis_dedup, "time", fake)
    return fake


def _cluster_state(port: int) -> str | None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)
    try:
        return client.cluster("INFO").get("cluster_state")
    finally:
        client.close()


def test_cluster_node_killed_fails_open(tmp_path: Path, clock: _Clock) -> None:
    """A master SIGKILLed (no replicas): lookups and marks fail open instead of raising; ``available`` is False.
    The probe's key lives on a master that stays up: once that master sees the cluster as failed (after
    ``--cluster-node-timeout``), it refuses the probe's write (CLUSTERDOWN) and ``probe`` says False."""
    with redis_cluster(tmp_path) as c:
        client = c.client()
        try:
            probe_port = client.get_node_from_key(PROBE_KEY).port
        finally:
            client.close()
        victim = next(node for node in c.nodes[1:] if node.port != probe_port)
        store = _store(c.url, retry_interval=0.2)
        try:
            assert store.mark(IDS[:100]) is True
            assert store.seen(IDS[:100]) == [True] * 100
            assert store.probe() is True
            victim.signal(signal.SIGKILL)
            victim.wait(10)
            started = time.monotonic()
            assert store.seen(IDS) is None  # the batch has keys on the dead master
            assert store.available is False
            clock.advance(0.3)  # past retry_interval: the mark goes to the cluster, it is not skipped
            assert store.mark(IDS) is False
            assert store.available is False
            wait_for(lambda: _cluster_state(probe_port) == "fail", 30, what=f"cluster_state:fail on {probe_port}")
            clock.advance(0.3)
            assert store.probe() is False  # refused by a live master, and it does not raise
            assert store.available is False
            # While the node stays dead, every batch keeps failing open (after the retry interval, too).
            clock.advance(0.3)
            assert store.seen(IDS) is None
            assert store.available is False
            assert time.monotonic() - started < 20
        finally:
            store.close()


def test_cluster_all_nodes_down_fails_open(tmp_path: Path, clock: _Clock) -> None:
    """No node reachable: redis-py raises RedisClusterException (not a RedisError); the store still fails open."""
    with redis_cluster(tmp_path) as c:
        store = _store(c.url, retry_interval=0.05)
        try:
            assert store.mark(IDS[:10]) is True
            for node in c.nodes:
                node.kill()
            for _ in range(2):
                clock.advance(0.1)  # past retry_interval: each call really goes to the cluster
                assert store.seen(IDS) is None
                clock.advance(0.1)
                assert store.mark(IDS) is False
                clock.advance(0.1)
                assert store.probe() is False
                assert store.available is False
        finally:
            store.close()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:7000/0", "redis://127.0.0.1:7000", "rediss://h:7000/"])
def test_cluster_url_forms_accepted(url: str) -> None:
    assert settings_from_mapping({"redis": {"url": url, "mode": "cluster"}}).redis.url == url


@pytest.mark.parametrize("url", ["redis://127.0.0.1:7000/1", "redis://h:7000?db=2", "unix:///tmp/redis.sock"])
def test_cluster_url_forms_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.url: .*cluster mode"):
        settings_from_mapping({"redis": {"url": url, "mode": "cluster"}})
    settings_from_mapping({"redis": {"url": url}})  # standalone takes them


async def test_service_in_cluster_mode_publishes_once_and_drops_marked(
    js, nats_server, cluster: RedisClusterNodes, cluster_client, tmp_path: Path
) -> None:
    await ensure_input(js)
    cluster_client.set("dedup:5:chatdb:acme:messages:msg-1", "")  # a replay older than JetStream's window
    svc = ServiceProcess(tmp_path, nats_server.url, cluster.url, name="svc-cluster", **{"redis.mode": "cluster"})
    svc.start()
    try:
        svc.wait_ready()
        await feed(js, "cdc.acme.messages", body(lsn=5))
        for lsn in range(10, 30):
            await feed(js, "cdc.acme.messages", body(lsn=lsn))
            await feed(js, "cdc.acme.messages", body(lsn=lsn))  # same change twice
        await wait_until(
            lambda: svc.metric("cdc_consumer_events_total", {"table": "messages"}) >= 41, what="all 41 handled"
        )
        info = await consumer_settled(js)
        assert info.num_pending == 0
        assert info.num_ack_pending == 0
        ids = [p["event_id"] for p in payloads(await read_all(js, OUTPUT))]
        assert ids == [f"{lsn}:chatdb:acme:messages:msg-1" for lsn in range(10, 30)]
        assert svc.metric("cdc_consumer_dedup_lookups_total", {"result": "hit"}) >= 1
        assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "duplicate"}) == 21
        assert svc.metric("cdc_consumer_redis_errors_total") == 0
        for lsn in (10, 19, 29):
            await wait_until(
                lambda lsn=lsn: cluster_client.exists(f"dedup:{lsn}:chatdb:acme:messages:msg-1"), 5, "marker"
            )
            assert cluster_client.ttl(f"dedup:{lsn}:chatdb:acme:messages:msg-1") > 250
        assert {
            cluster_client.get_node_from_key(f"dedup:{lsn}:chatdb:acme:messages:msg-1").port for lsn in range(10, 30)
        } == {n.port for n in cluster.nodes}
    finally:
        svc.stop()


def test_an_unreachable_cluster_at_start_up_fails_open_instead_of_raising() -> None:
    nobody = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", mode="cluster", socket_timeout=0.2)
    store = RedisDedupStore(nobody, DedupSettings(), pool_size=2)  # the service builds this before connecting
    assert store.seen(["1:chatdb:acme:messages:a"]) is None
    assert store.mark(["1:chatdb:acme:messages:a"]) is False
    assert store.probe() is False
    assert store.available is False
    store.close()


def test_cluster_claims_across_slots(cluster: RedisClusterNodes, cluster_client) -> None:
    from tests.integration.claim_checks import check_claims, check_claims_expire, check_claims_off, store

    def make(**kw):
        return store(cluster.url, "cluster", **kw)

    check_claims(make, cluster_client)
    cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
    check_claims_expire(make, cluster_client)
    cluster_client.flushall(target_nodes=RedisCluster.PRIMARIES)
    check_claims_off(make, cluster_client)
