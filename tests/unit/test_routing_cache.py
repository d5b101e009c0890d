"""Deletes without full row images (no REPLICA IDENTITY FULL) routed from the routing cache, with fakes."""

from __future__ import annotations

from typing import Any

import orjson
import simdjson
from prometheus_client import CollectorRegistry

from cdc_service.config import Settings
from cdc_service.core.correlation import request_id
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import DeadLetter, Publish, Reason, Retry
from cdc_service.core.routes import compile_route
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage
from cdc_service.worker import BatchPreparer
from tests.sequin import body, encode

ROUTES = {
    **Settings().routes,
    "messages": compile_route(
        "messages", "message_id", "wa.{company}.{agent_id}.messages.{chat_id}", routing_cache=True
    ),
}


def _preparer(store: FakeDedupStore, max_deliver: int = 3) -> BatchPreparer:
    builder = EventBuilder(Settings().layout, ROUTES, 1 << 20)
    return BatchPreparer(builder, store, Metrics(CollectorRegistry()), max_deliver=max_deliver)


def _delete(message_id: str, lsn: int) -> bytes:
    doc: dict[str, Any] = body("messages", lsn=lsn, action="delete", message_id=message_id)
    doc["record"] = {"message_id": message_id}
    return encode(doc)


def _msg(data: bytes, seq: int) -> FakeMessage:
    return FakeMessage("cdc.acme.messages", data, seq=seq)


def test_an_insert_carries_its_routing_entry_and_a_delete_is_routed_by_it() -> None:
    store = FakeDedupStore()
    [insert] = _preparer(store)([_msg(encode(body("messages", message_id="m1", agent_id="a7", chat_id="c9")), 1)])
    assert isinstance(insert, Publish) and insert.routing is not None
    key, fields = insert.routing
    assert key == "chatdb:acme:messages:m1"
    assert orjson.loads(fields) == {"agent_id": "a7", "chat_id": "c9"}
    store.remember_routes([insert.routing])
    # A fresh preparer (another replica): only the store knows the row.
    [delete] = _preparer(store)([_msg(_delete("m1", 2), 2)])
    assert isinstance(delete, Publish), delete
    assert delete.subject == "wa.acme.a7.messages.c9"
    assert delete.routing is None  # deletes do not write entries
    assert delete.request_id == request_id(delete.event_id)  # re-planned deletes carry X-Request-ID like any event
    event = orjson.loads(delete.payload)
    assert (event["action"], event["agent_id"], event["row_data"]) == ("delete", "a7", {"message_id": "m1"})


def test_an_unknown_row_stays_a_dead_letter_and_an_unreachable_store_is_retried() -> None:
    [unknown] = _preparer(FakeDedupStore())([_msg(_delete("m2", 3), 3)])
    assert isinstance(unknown, DeadLetter) and unknown.reason == Reason.MISSING_FIELD
    assert "no cached routing" in unknown.detail
    [outage] = _preparer(FakeDedupStore(down=True))([_msg(_delete("m2", 3), 3)])
    assert isinstance(outage, Retry)


def test_a_delete_in_the_same_batch_as_its_insert_is_routed() -> None:
    store = FakeDedupStore()
    outcomes = _preparer(store)(
        [
            _msg(encode(body("messages", lsn=1, message_id="m3", agent_id="a8", chat_id="c3")), 1),
            _msg(_delete("m3", 2), 2),
        ]
    )
    assert [type(o).__name__ for o in outcomes] == ["Publish", "Publish"]
    assert outcomes[1].subject == "wa.acme.a8.messages.c3"  # type: ignore[union-attr]


def test_routes_without_the_cache_dead_letter_as_before() -> None:
    builder = EventBuilder(Settings().layout, {**ROUTES, "messages": Settings().routes["messages"]}, 1 << 20)
    assert not Settings().routes["messages"].routing_cache
    plain = builder.plan("cdc.acme.messages", _delete("m4", 4), simdjson.Parser())
    assert isinstance(plain, DeadLetter) and plain.reason == Reason.MISSING_FIELD and not plain.routing_key
