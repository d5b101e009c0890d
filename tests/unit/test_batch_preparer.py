"""``BatchPreparer`` on one batch: each message's delivery attempt read once serves the redelivery count, a bug's
retry delay and the check of final deliveries against their dead letters."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import DeadLetter, Duplicate, Publish, Reason, Retry, dead_letter_id
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage
from cdc_service.worker import BatchPreparer
from tests.sequin import body, encode

STREAM = "cdc_events_stream"


def _message(seq: int, delivered: int) -> FakeMessage:
    data = encode(body("messages", lsn=seq, message_id=f"m{seq}", chat_id="c1"))
    return FakeMessage("cdc.acme.messages", data, seq=seq, delivered=delivered, stream=STREAM)


def _preparer(store: FakeDedupStore, max_deliver: int) -> tuple[BatchPreparer, CollectorRegistry]:
    settings = Settings()
    registry = CollectorRegistry()
    builder = EventBuilder(settings.layout, settings.routes, 1 << 20)
    return BatchPreparer(builder, store, Metrics(registry), max_deliver=max_deliver), registry


@pytest.mark.parametrize("max_deliver", [3, 0])
def test_only_final_deliveries_already_dead_lettered_become_duplicates(max_deliver: int) -> None:
    # Every message's dead letter is marked; only those on their final delivery (3 of 3, or past it) are dropped.
    store = FakeDedupStore(marked={dead_letter_id(STREAM, seq) for seq in range(1, 6)})
    prepare, registry = _preparer(store, max_deliver)
    outcomes = prepare([_message(1, 1), _message(2, 3), _message(3, 2), _message(4, 4), _message(5, 1)])
    kinds = [type(o).__name__ for o in outcomes]
    if max_deliver:
        assert kinds == ["Publish", "Duplicate", "Publish", "Duplicate", "Publish"]
        assert all(isinstance(o, Duplicate) and o.event_id for o in (outcomes[1], outcomes[3]))
    else:  # no limit: nothing is ever a final delivery
        assert kinds == ["Publish"] * 5
    assert all(o.claimed for o in outcomes if isinstance(o, Publish))
    assert registry.get_sample_value("cdc_consumer_redeliveries_total") == 3


def test_no_final_delivery_asks_nothing_about_dead_letters() -> None:
    store = FakeDedupStore()
    prepare, _ = _preparer(store, 3)
    prepare([_message(1, 1), _message(2, 2)])
    assert store.lookups == 1  # the claim only


class _Broken(EventBuilder):
    __slots__ = ()

    def plan(self, *args: object, **kwargs: object) -> Publish:
        raise RuntimeError("a bug")


def test_a_bug_is_retried_unless_on_the_messages_final_delivery() -> None:
    settings = Settings()
    builder = _Broken(settings.layout, settings.routes, 1 << 20)
    prepare = BatchPreparer(builder, FakeDedupStore(), Metrics(CollectorRegistry()), max_deliver=4)
    first, fourth = prepare([_message(1, 1), _message(2, 4)])
    assert isinstance(first, Retry)
    assert isinstance(fourth, DeadLetter) and fourth.reason is Reason.MAX_DELIVERIES
    assert "delivery 4 of 4" in fourth.detail
