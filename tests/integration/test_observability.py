"""Observability against real servers: the Prometheus metrics, the liveness and readiness probes (including NATS
going away and coming back), JSON logs on stdout, and the worker pool size."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from cdc_service import __version__
from cdc_service.service import available_cpus
from tests.integration.helpers import OUTPUT, consumer_settled, ensure_input, feed, wait_count, wait_until
from tests.sequin import body


def _samples(svc: Any) -> dict[str, list[Any]]:
    """Every sample of ``/metrics`` by family name (counters lose their ``_total`` suffix in the family name)."""
    status, raw = svc.get("/metrics")
    assert status == 200
    return {family.name: family.samples for family in text_string_to_metric_families(raw.decode())}


def _json(svc: Any, path: str) -> tuple[int, dict[str, Any]]:
    status, raw = svc.get(path)
    doc = json.loads(raw)
    assert isinstance(doc, dict), raw
    return status, doc


async def test_metrics_after_one_published_event(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    await feed(js, "cdc.acme.messages", body("messages"))
    assert await wait_count(js, OUTPUT, 1) == 1
    await consumer_settled(js)
    await wait_until(
        lambda: svc.metric("cdc_consumer_processing_seconds_count", {"table": "messages"}) == 1,
        what="processing histogram observed once",
    )

    families = _samples(svc)
    for name in (
        "cdc_consumer_events",
        "cdc_consumer_processing_seconds",
        "cdc_consumer_publish_errors",
        "cdc_consumer_lag_seconds",
        "cdc_consumer_dedup_lookups",
        "cdc_consumer_dead_letters",
        "cdc_consumer_redeliveries",
        "cdc_consumer_batch_size",
        "cdc_consumer_inflight_messages",
        "cdc_consumer_pool_size",
        "cdc_consumer_pool_queue_depth",
    ):
        assert name in families, f"{name} missing from /metrics: {sorted(families)}"

    assert svc.metric("cdc_consumer_events_total", {"table": "messages", "result": "published"}) == 1
    assert svc.metric("cdc_consumer_processing_seconds_count", {"table": "messages"}) == 1
    assert svc.metric("cdc_consumer_lag_seconds_count") == 1
    assert svc.metric("cdc_consumer_publish_errors_total") == 0
    assert any(s.name == "cdc_consumer_publish_errors_total" for s in families["cdc_consumer_publish_errors"])
    lookups = {s.labels["result"]: s.value for s in families["cdc_consumer_dedup_lookups"] if s.name.endswith("_total")}
    assert lookups == {"hit": 0, "miss": 1, "held": 0, "error": 0}
    assert svc.metric("cdc_consumer_inflight_messages") == 0
    assert svc.metric("cdc_consumer_build_info", {"version": __version__}) == 1
    # No per-subject or per-id labels anywhere.
    for samples in families.values():
        for sample in samples:
            assert not {"subject", "event_id", "company", "agent_id", "chat_id", "message_id"} & set(sample.labels)


async def test_probes_answer_json_when_healthy(js, start_service) -> None:
    svc = start_service()
    status, live = _json(svc, "/healthz")
    assert status == 200
    assert live["status"] == "ok"
    status, ready = _json(svc, "/readyz")
    assert status == 200
    assert ready["status"] == "ok"
    assert ready.get("nats") == "connected"
    assert ready.get("redis") == "ok"
    assert svc.get("/nope")[0] == 404


async def test_readiness_fails_while_nats_is_down_and_recovers(nc, js, start_service, nats_server) -> None:
    await ensure_input(js)
    svc = start_service()
    try:
        nats_server.stop()

        def not_ready() -> dict[str, Any] | None:
            status, doc = _json(svc, "/readyz")
            return doc if status == 503 else None

        doc = await wait_until(not_ready, timeout=20, what="/readyz 503 with NATS stopped")
        assert doc["status"] == "fail"
        assert doc["reason"].startswith("not connected to NATS: "), doc
        assert nats_server.url in doc["reason"], doc
        # Liveness is not readiness: a lost connection must not get the pod restarted.
        assert svc.get("/healthz")[0] == 200
    finally:
        if not nats_server.alive():
            nats_server.start()

    await wait_until(lambda: svc.get("/readyz")[0] == 200, timeout=30, what="/readyz 200 after NATS is back")
    # Ready again means working again: the next event flows.
    await wait_until(lambda: nc.is_connected, timeout=30, what="test client reconnected")
    await feed(js, "cdc.acme.messages", body("messages"))
    assert await wait_count(js, OUTPUT, 1, timeout=30) == 1, svc.output()[-3000:]
    assert svc.alive()


async def test_every_stdout_line_is_a_json_log_record(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    await feed(js, "cdc.acme.messages", body("messages"))
    await feed(js, "cdc.acme.messages", b"not json")  # a warning with per-event context
    await feed(js, "cdc.acme.users", body("users"))
    assert await wait_count(js, OUTPUT, 1) == 1
    await consumer_settled(js)
    assert svc.stop() == 0

    lines = svc.output().splitlines()
    assert lines, "the service printed nothing"
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert record.get("service") == "cdc_service", line
        assert isinstance(record.get("level"), str), line
        assert record["level"], line
        assert isinstance(record.get("message"), str), line
        assert isinstance(record.get("time"), str), line
        assert record["time"], line
    messages = [json.loads(line)["message"] for line in lines]
    assert "starting" in messages
    assert "stopped" in messages
    (starting,) = [json.loads(line) for line in lines if json.loads(line)["message"] == "starting"]
    assert starting["version"] == __version__
    dead = [json.loads(line) for line in lines if json.loads(line)["message"] == "dead-lettering message"]
    assert len(dead) == 1
    assert dead[0]["level"] == "WARNING"
    assert dead[0]["subject"] == "cdc.acme.messages"
    assert dead[0]["reason"] == "invalid_json"


async def test_pool_size_setting(js, start_service) -> None:
    svc = start_service(**{"workers.pool_size": 3})
    assert svc.metric("cdc_consumer_pool_size") == 3
    starting = [r for r in svc.logs() if r.get("message") == "starting"]
    assert starting
    assert starting[0]["pool_size"] == 3


async def test_default_pool_size(js, start_service) -> None:
    svc = start_service()
    assert svc.metric("cdc_consumer_pool_size") == max(2, available_cpus() * 4)
