"""The Redis claim against a real standalone redis-server (the cluster form is in test_redis_cluster.py)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.integration.claim_checks import IDS, check_claims, check_claims_expire, check_claims_off, store
from tests.servers import RedisServer, free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def client(redis_server: RedisServer) -> Any:
    if not redis_server.alive():
        redis_server.start()
    c = redis.Redis.from_url(redis_server.url)
    c.flushall()
    yield c
    c.close()


def test_claim_lifecycle(redis_server: RedisServer, client: Any) -> None:
    check_claims(lambda **kw: store(redis_server.url, **kw), client)


def test_claims_expire(redis_server: RedisServer, client: Any) -> None:
    check_claims_expire(lambda **kw: store(redis_server.url, **kw), client)


def test_claims_off_only_look_up(redis_server: RedisServer, client: Any) -> None:
    check_claims_off(lambda **kw: store(redis_server.url, **kw), client)


def test_a_legacy_marker_value_counts_as_done(redis_server: RedisServer, client: Any) -> None:
    client.set("dedup:" + IDS[0], "1")  # any value that is not a claim is a marker
    s = store(redis_server.url)
    try:
        assert s.seen(IDS[:1]) == [True]
        assert [c.value for c in s.claim(IDS[:1]) or []] == ["done"]
    finally:
        s.close()


def test_unreachable_redis_claims_nothing_and_does_not_raise() -> None:
    s = store(f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert s.claim(IDS[:3]) is None
        s.release(IDS[:3])
        assert s.available is False
    finally:
        s.close()
