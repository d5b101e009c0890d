"""The engine with the in-memory fakes, a real thread pool and the real asyncio loop: shared by the pipeline tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.engine import Engine
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage, FakePublisher, ManualClock
from cdc_service.worker import BatchPreparer
from tests.sequin import body, encode


@dataclass
class Harness:
    settings: Settings
    publisher: Any
    dedup: Any
    executor: ThreadPoolExecutor
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    wrap: Any = None  # optional callable(preparer) -> preparer
    clock: ManualClock = field(default_factory=ManualClock)
    engine: Engine | None = None

    def build(self) -> Engine:
        metrics = Metrics(self.registry)
        s = self.settings
        builder = EventBuilder(s.layout, s.routes, s.ingest.max_payload_bytes)
        prepare: Any = BatchPreparer(builder, self.dedup, metrics, max_deliver=s.ingest.max_deliver)
        if self.wrap is not None:
            prepare = self.wrap(prepare)
        self.engine = Engine(s, prepare, self.dedup, self.publisher, self.executor, metrics, clock=self.clock)
        return self.engine

    async def run(self, messages: Sequence[FakeMessage], *, deadline: float = 5.0, on_start: Any = None) -> Engine:
        """Feed ``messages`` and drain; ``deadline`` bounds the drain (its hand-back is tested where it matters)."""
        engine = self.build()
        await engine.start()
        if on_start is not None:
            on_start()
        for msg in messages:
            await engine.on_message(msg)
        await engine.drain(self.clock.monotonic() + deadline)
        return engine

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if value is None else value

    def events(self, table: str, result: str) -> float:
        return self.sample("cdc_consumer_events_total", {"table": table, "result": result})

    @property
    def published_ids(self) -> list[str]:
        return [p.headers["Nats-Msg-Id"] for p in self.publisher.published if p.subject.startswith("wa.")]


def harness(
    executor: ThreadPoolExecutor,
    *,
    settings: Settings | None = None,
    publisher: Any = None,
    dedup: Any = None,
    **kwargs: Any,
) -> Harness:
    return Harness(
        settings or Settings(),
        publisher if publisher is not None else FakePublisher(),
        dedup if dedup is not None else FakeDedupStore(),
        executor,
        **kwargs,
    )


def message(
    table: str = "messages", *, seq: int = 1, delivered: int = 1, company: str = "acme", **fields: Any
) -> FakeMessage:
    return FakeMessage(f"cdc.{company}.{table}", encode(body(table, **fields)), seq=seq, delivered=delivered)


def chat_messages(count: int, *, chat: str = "chat-1", start: int = 0, seq0: int = 1) -> list[FakeMessage]:
    return [
        message(seq=seq0 + i, lsn=1000 + start + i, message_id=f"msg-{start + i}", chat_id=chat) for i in range(count)
    ]


def settled_once(msg: FakeMessage) -> bool:
    return msg.acked + msg.termed + len(msg.naked) == 1


async def wait_until(check: Callable[[], Any | Awaitable[Any]], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``check`` (sync or async) until truthy; ``TimeoutError`` naming ``what`` after ``timeout`` seconds.

    The same contract as the repository's polling helper; kept here so unit tests import nothing from
    ``tests/integration``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)  # the poll interval of a deadline loop
