"""Schema drift: per-table expected columns, counted and logged once per (table, column), with a bounded label set."""

from __future__ import annotations

import logging

import pytest
import simdjson
from prometheus_client import CollectorRegistry

from cdc_service.config import ConfigError, settings_from_mapping
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import Publish
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage
from cdc_service.worker import BatchPreparer, ColumnDrift
from tests.sequin import body, encode

EXPECTED = ["message_id", "chat_id", "agent_id", "company_id", "body", "created_at"]


def _preparer(columns: list[str] | None) -> tuple[BatchPreparer, Metrics]:
    routes = {"messages": {"columns": columns}} if columns else {}
    settings = settings_from_mapping({"routes": routes})
    metrics = Metrics(CollectorRegistry())
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    return BatchPreparer(builder, FakeDedupStore(), metrics, max_deliver=3), metrics


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def _row(**record: object) -> dict[str, object]:
    doc = body("messages")
    doc["record"] = {**{k: doc["record"].get(k, "x") for k in EXPECTED}, **record}
    return doc


@pytest.mark.parametrize(
    ("record", "unexpected", "missing"),
    [
        ({}, (), ()),
        ({"edited_at": "2024-01-01"}, ("edited_at",), ()),
        ({"body": None}, (), ()),  # present but null is not drift
    ],
)
def test_plan_reports_drift(record: dict[str, object], unexpected: tuple[str, ...], missing: tuple[str, ...]) -> None:
    settings = settings_from_mapping({"routes": {"messages": {"columns": EXPECTED}}})
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    outcome = builder.plan("cdc.acme.messages", encode(_row(**record)), simdjson.Parser())
    assert isinstance(outcome, Publish)
    assert outcome.drift == ((unexpected, missing) if unexpected or missing else None)


def test_missing_column_and_deletes() -> None:
    settings = settings_from_mapping({"routes": {"messages": {"columns": EXPECTED}}})
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    doc = _row()
    del doc["record"]["created_at"]
    outcome = builder.plan("cdc.acme.messages", encode(doc), simdjson.Parser())
    assert isinstance(outcome, Publish) and outcome.drift == ((), ("created_at",))
    doc["action"] = "delete"  # a delete may carry only the replica identity: not drift
    outcome = builder.plan("cdc.acme.messages", encode(doc), simdjson.Parser())
    assert isinstance(outcome, Publish) and outcome.drift is None


def test_counted_every_time_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    prepare, metrics = _preparer(EXPECTED)
    messages = [FakeMessage("cdc.acme.messages", encode(_row(edited_at=i))) for i in range(3)]
    with caplog.at_level(logging.WARNING, "cdc_service.worker"):
        prepare(messages)
        prepare(messages)
    name = "cdc_consumer_unhandled_fields_total"
    assert _sample(metrics, name, table="messages", field_name="edited_at") == 6
    drift_lines = [r for r in caplog.records if r.getMessage().startswith("schema drift")]
    assert len(drift_lines) == 1
    assert (drift_lines[0].table, drift_lines[0].field_name) == ("messages", "edited_at")  # type: ignore[attr-defined]


def test_no_columns_setting_means_no_check() -> None:
    prepare, metrics = _preparer(None)
    prepare([FakeMessage("cdc.acme.messages", encode(_row(edited_at=1)))])
    assert _sample(metrics, "cdc_consumer_unhandled_fields_total", table="messages", field_name="edited_at") == 0


def test_label_set_is_capped_then_other(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(CollectorRegistry())
    drift = ColumnDrift(metrics, max_series=3)
    with caplog.at_level(logging.WARNING, "cdc_service.worker"):
        drift.record([("messages", (f"col_{i}",), ()) for i in range(1000)])
        drift.record([("messages", ("x" * 500, "bad\nname"), ())])
    families = {
        s.labels["field_name"] for s in metrics.unhandled_fields.collect()[0].samples if s.name.endswith("_total")
    }
    assert families == {"col_0", "col_1", "col_2", "other"}
    assert _sample(metrics, "cdc_consumer_unhandled_fields_total", table="messages", field_name="other") == 999
    assert len([r for r in caplog.records if r.getMessage().startswith("schema drift")]) == 4  # 3 + "over the cap"
    assert len(drift._children) == 4


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ([], "routes.messages.columns: expected a non-empty list"),
        (["body"], "routes.messages.columns: columns must include"),
        ([1, 2], "routes.messages.columns: expected a non-empty list"),
    ],
)
def test_bad_columns_setting_names_the_key(columns: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"routes": {"messages": {"columns": columns}}})
    assert str(info.value).startswith(message)


def test_columns_from_a_comma_separated_string() -> None:
    settings = settings_from_mapping({"routes": {"messages": {"columns": " message_id, chat_id ,agent_id"}}})
    assert settings.routes["messages"].columns == {"message_id", "chat_id", "agent_id"}
    assert settings.masked()["routes"]["messages"]["columns"] == ["agent_id", "chat_id", "message_id"]


def test_shape_cache_is_bounded_and_right() -> None:
    settings = settings_from_mapping({"routes": {"messages": {"columns": EXPECTED}}})
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    parser = simdjson.Parser()
    for i in range(1500):
        outcome = builder.plan("cdc.acme.messages", encode(_row(**{f"extra_{i}": 1})), parser)
        assert isinstance(outcome, Publish) and outcome.drift == ((f"extra_{i}",), ())
    wide = _row(**{f"c{i}": 1 for i in range(300)})
    outcome = builder.plan("cdc.acme.messages", encode(wide), parser)
    assert isinstance(outcome, Publish) and outcome.drift is not None and len(outcome.drift[0]) == 300
    assert len(builder._drifts) <= 1000
    assert all(len(shape) <= 257 for shape in builder._drifts)
