"""No duplicate on the wire: a plain (core) NATS subscriber on ``wa.>`` sees each event once, not only ``wa_stream``.

JetStream's ``Nats-Msg-Id`` window keeps a repeated event out of the stream, but the repeat still travels on the core
subject. These tests feed the same Sequin message twice, at spacings from 0 to 20 ms, into one replica and into two,
and count what a core subscription receives per ``Nats-Msg-Id``. Further cases: a replica SIGKILL'd while it holds
claims, and a publish that fails while a second copy waits (both with a nats-server whose permissions keep a
replica's failing publishes off the wire, so every publish that reached it counts).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from nats.aio.client import Client

from tests.integration.helpers import OUTPUT, consumer_settled, ensure_input, payloads, read_all, wait_count
from tests.sequin import body

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
            ids.append(f"{lsn}:messages:m{lsn}")
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
