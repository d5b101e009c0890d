"""``MaxDeliveriesWatcher.handle`` with the real ``BatchPreparer`` and fakes: what it does with the message an advisory
names, depending on what Redis says about that message's event (cdc_service/advisories.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from cdc_service.advisories import MaxDeliveriesWatcher
from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import Publish, dead_letter_id
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage, FakePublisher
from cdc_service.worker import BatchPreparer
from tests.sequin import body, encode

STREAM = Settings().ingest.stream
DATA = encode(body("messages", lsn=7, message_id="m0", chat_id="c0"))
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class _Stored:
    """A nats-py RawStreamMsg as ``js.get_msg`` returns it."""

    subject: str
    data: bytes
    headers: dict[str, str] | None


class _FakeJs:
    def __init__(self, headers: dict[str, str] | None = None) -> None:
        self.headers = headers

    async def get_msg(self, stream: str, seq: int) -> _Stored:
        return _Stored("cdc.acme.messages", DATA, self.headers)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown()


def _watcher(
    store: FakeDedupStore, publisher: FakePublisher, executor: ThreadPoolExecutor, js: Any = None
) -> tuple[MaxDeliveriesWatcher, BatchPreparer]:
    settings = Settings()
    metrics = Metrics(CollectorRegistry())
    builder = EventBuilder(settings.layout, settings.routes, 1 << 20)
    prepare = BatchPreparer(builder, store, metrics, max_deliver=settings.ingest.max_deliver)
    watcher = MaxDeliveriesWatcher(js or _FakeJs(), settings, prepare, store, publisher, executor, metrics)
    return watcher, prepare


def _advisory(seq: int = 1) -> bytes:
    return orjson.dumps({"stream": STREAM, "stream_seq": seq, "deliveries": 2})


def _event_id(prepare: BatchPreparer) -> str:
    [planned] = prepare([FakeMessage("cdc.acme.messages", DATA, seq=1)])
    assert isinstance(planned, Publish)
    return planned.event_id


@pytest.mark.parametrize("claims_on", [True, False])
async def test_an_event_published_before_its_advisory_is_handled_is_not_dead_lettered(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture, claims_on: bool
) -> None:
    """A replica held the final delivery past its AckWait, then published it and wrote its marker: dead-lettering
    it as well would make one change both an event downstream and a dead letter (it failed before: the preparer
    raised on the stored message, so the marker was never looked up)."""
    store, publisher = FakeDedupStore(claims_on=claims_on), FakePublisher()
    watcher, prepare = _watcher(store, publisher, executor)
    store.marked.add(_event_id(prepare))
    with caplog.at_level(logging.ERROR):
        assert await watcher.handle(_advisory()) == "already_published"
    assert publisher.published == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_an_event_nobody_published_is_dead_lettered_without_an_error_and_without_a_claim_left(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    store, publisher = FakeDedupStore(), FakePublisher()
    watcher, prepare = _watcher(store, publisher, executor, _FakeJs({"traceparent": TRACEPARENT}))
    event_id = _event_id(prepare)
    store.claims.clear()  # _event_id's own lookup claimed it
    with caplog.at_level(logging.ERROR):
        assert await watcher.handle(_advisory()) == "dead_lettered"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    [dead] = publisher.published
    assert dead.headers["Nats-Msg-Id"] == dead_letter_id(STREAM, 1)
    assert dead.headers["Cdc-Error-Reason"] == "max_deliveries"
    assert dead_letter_id(STREAM, 1) in store.marked
    assert event_id not in store.claims  # no claim of the watcher left to hold up a replay of the dead letter


async def test_an_event_another_replica_is_publishing_is_looked_at_again(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    """Another replica's claim: it is publishing that final delivery right now. Neither dead-letter it nor fail
    loudly: retry (the advisory comes back after a delay, and then the marker says published)."""
    store, publisher = FakeDedupStore(), FakePublisher()
    watcher, prepare = _watcher(store, publisher, executor)
    event_id = _event_id(prepare)
    store.claims[event_id] = "replica-b"
    with caplog.at_level(logging.ERROR):
        assert await watcher.handle(_advisory()) == "retried"
    assert publisher.published == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
