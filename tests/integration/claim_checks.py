"""Checks of ``RedisDedupStore.claim`` / ``release`` / ``mark`` shared by the standalone and cluster tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cdc_service.adapters.redis_dedup import RedisDedupStore
from cdc_service.config import DedupSettings, RedisSettings
from cdc_service.ports import Claim
from tests.servers import wait_for

IDS = [f"{2000 + i}:chatdb:acme:messages:msg-{i}" for i in range(300)]


def store(url: str, mode: str = "standalone", **dedup: Any) -> RedisDedupStore:
    settings = DedupSettings(**{"ttl": 300, "claim_ttl": 5.0, **dedup})
    return RedisDedupStore(RedisSettings(url=url, mode=mode, socket_timeout=1.0), settings, pool_size=2)


def check_claims(make: Callable[..., RedisDedupStore], client: Any) -> None:
    """Two replicas (two stores, two tokens) against one Redis: the claim lifecycle across many keys."""
    a, b = make(), make()
    try:
        assert a.token != b.token
        assert a.claim(IDS) == [Claim.CLAIMED] * len(IDS)
        assert client.get("dedup:" + IDS[0]) == a.token
        assert 0 < client.pttl("dedup:" + IDS[-1]) <= 5000
        assert b.claim(IDS[:3]) == [Claim.HELD] * 3
        assert a.claim(IDS[:2]) == [Claim.CLAIMED] * 2  # our own: a copy in flight here
        assert a.seen(IDS[:2]) == [False, False]  # a claim is not a marker
        b.release(IDS[:2])  # not b's to release
        assert client.get("dedup:" + IDS[0]) == a.token
        assert a.mark(IDS[:1]) is True  # published: the marker replaces the claim
        assert client.get("dedup:" + IDS[0]) == b""
        assert client.ttl("dedup:" + IDS[0]) > 250
        a.release(IDS[:2])  # the marker stays; the claim goes
        assert client.get("dedup:" + IDS[0]) == b""
        assert client.exists("dedup:" + IDS[1]) == 0
        assert b.claim([IDS[0], IDS[1], IDS[2], "new:messages:x"]) == [
            Claim.DONE,
            Claim.CLAIMED,
            Claim.HELD,
            Claim.CLAIMED,
        ]
        assert a.seen([IDS[0], IDS[1]]) == [True, False]
    finally:
        a.close()
        b.close()


def check_claims_expire(make: Callable[..., RedisDedupStore], client: Any) -> None:
    """A replica that dies holding claims: they expire on their own and another replica takes them."""
    dead, alive = make(claim_ttl=0.3), make(claim_ttl=0.3)
    try:
        assert dead.claim(IDS[:50]) == [Claim.CLAIMED] * 50
        assert alive.claim(IDS[:50]) == [Claim.HELD] * 50
        wait_for(lambda: client.exists(*("dedup:" + i for i in IDS[:1])) == 0, 5, what="claim expired")
        wait_for(lambda: alive.claim(IDS[:50]) == [Claim.CLAIMED] * 50, 5, what="claims taken over")
    finally:
        dead.close()
        alive.close()


def check_claims_off(make: Callable[..., RedisDedupStore], client: Any) -> None:
    off = make(claim_ttl=0)
    try:
        assert off.mark(IDS[:1]) is True
        assert off.claim(IDS[:3]) == [Claim.DONE, Claim.FREE, Claim.FREE]
        assert client.exists("dedup:" + IDS[1]) == 0
    finally:
        off.close()
