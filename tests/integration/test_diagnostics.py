"""What an operator reads when something is wrong: the real ``python -m cdc_service`` process against a NATS that
refuses, a NATS host that never answers, a NATS that comes back; and the console log format."""

from __future__ import annotations

import json
import socket
from typing import Any

from cdc_service.core.correlation import request_id
from tests.integration.helpers import DLQ, INPUT, OUTPUT, ensure_input, feed, read_all, wait_count, wait_until
from tests.sequin import body, encode
from tests.servers import ServiceProcess, free_port, wait_for


def _attempts(svc: ServiceProcess) -> list[dict[str, Any]]:
    return [line for line in svc.logs() if "attempt" in line and line.get("component") == "nats"]


def _ready_reason(svc: ServiceProcess) -> str:
    status, body = svc.get("/readyz")
    assert status == 503
    return str(json.loads(body)["reason"])


def test_refused_nats_logs_url_attempt_and_next_attempt(workdir, redis_server) -> None:
    url = f"nats://svc:s3cret@127.0.0.1:{free_port()}"
    svc = ServiceProcess(workdir, url, redis_server.url, name="refused", **{"nats.reconnect_wait": 0.2})
    svc.start()
    try:
        wait_for(lambda: len(_attempts(svc)) >= 3, 20, what="three logged attempts")
        first, _, third = _attempts(svc)[:3]
        masked = url.replace("s3cret", "***")
        assert first["nats_url"] == masked
        assert (first["attempt"], third["attempt"]) == (1, 3)
        assert first["next_attempt_in"] == 0.2
        assert first["error"].startswith("ConnectionRefusedError")
        assert masked in first["message"] and "attempt 1" in first["message"]
        reason = _ready_reason(svc)
        assert reason.startswith(f"cannot connect to NATS at {masked} (attempt ")
        assert "s3cret" not in svc.output()
    finally:
        svc.stop()


def test_black_holed_nats_host_says_what_the_timeout_means(workdir, redis_server) -> None:
    # Accepts TCP and never says a word, like a host behind a firewall that drops the NATS handshake.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        overrides = {"nats.reconnect_wait": 0.1, "nats.connect_timeout": 0.3}
        svc = ServiceProcess(workdir, url, redis_server.url, name="blackhole", **overrides)
        svc.start()
        try:
            wait_for(lambda: len(_attempts(svc)) >= 2, 20, what="two logged attempts")
            error = _attempts(svc)[0]["error"]
            assert error == "TimeoutError: no answer within nats.connect_timeout (0.3s)"
            assert "TimeoutError: " in _ready_reason(svc)
            assert not any(line.get("error", "x").strip() == "TimeoutError:" for line in svc.logs())
        finally:
            svc.stop()


def test_console_format_is_readable(start_service) -> None:
    svc = start_service(**{"log.format": "console"})
    svc.stop()
    lines = svc.output().splitlines()
    consuming = [line for line in lines if " INFO " in line and " consuming" in line]
    assert consuming, svc.output()[-2000:]
    assert "stream=cdc_events_stream" in consuming[0]
    assert not any(line.startswith("{") for line in lines)


async def test_invalid_json_has_a_plain_reason_and_correlated_log_lines(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    seq = await feed(js, "cdc.acme.messages", b'{"record": {"message_id": "m1",\n\t')
    assert await wait_count(js, DLQ, 1) == 1
    (dead,) = await read_all(js, DLQ)
    detail = dead.headers["Cdc-Error-Detail"]
    assert (
        detail
        == "body is not valid JSON: expecting property name enclosed in double quotes at byte 33 (line 2, column 2)"
    )
    await wait_until(lambda: any(r.get("message") == "dead letter stored" for r in svc.logs()), what="stored line")
    warning = next(r for r in svc.logs() if r.get("message") == "dead-lettering message")
    assert (warning["stream"], warning["stream_seq"], warning["detail"]) == (INPUT, seq, detail)
    stored = next(r for r in svc.logs() if r.get("message") == "dead letter stored")
    assert (stored["stream"], stored["stream_seq"], stored["dlq_stream"], stored["dlq_seq"]) == (
        INPUT,
        seq,
        DLQ,
        dead.seq,
    )
    assert "TAPE_ERROR" not in svc.output() and "fatal" not in svc.output()


async def test_published_events_carry_request_id_and_traceparent(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await js.publish("cdc.acme.messages", encode(body("messages", lsn=1)), headers={"traceparent": trace})
    await feed(js, "cdc.acme.messages", body("messages", lsn=2, message_id="m2"))
    assert await wait_count(js, OUTPUT, 2) == 2
    traced, plain = await read_all(js, OUTPUT)
    for msg in (traced, plain):
        event_id = json.loads(msg.data)["event_id"]
        assert msg.headers["X-Request-ID"] == request_id(event_id)
    assert traced.headers["traceparent"] == trace
    assert "traceparent" not in plain.headers
    assert svc.alive()


async def test_summary_line_has_interval_rate_lag_and_backlog(js, start_service) -> None:
    await ensure_input(js)
    svc = start_service(**{"log.summary_interval": 0.5, "ingest.consumer_check_interval": 0.2})
    for i in range(5):
        await feed(js, "cdc.acme.messages", body("messages", lsn=i + 1, message_id=f"m{i}"))
    assert await wait_count(js, OUTPUT, 5) == 5

    def summed() -> int:
        return sum(r.get("interval_published", 0) for r in svc.logs() if r.get("message") == "summary")

    await wait_until(lambda: summed() == 5, what="summaries adding up to the 5 published events")
    await wait_until(
        lambda: any(r.get("message") == "summary" and r.get("backlog") == 0 for r in svc.logs()), what="backlog 0"
    )
    busy = next(r for r in svc.logs() if r.get("message") == "summary" and r.get("interval_published"))
    assert busy["published_per_second"] > 0
    assert busy["handled_per_second"] >= busy["published_per_second"]
    assert isinstance(busy["lag_seconds"], float) and busy["lag_seconds"] >= 0
    assert busy["interval_seconds"] > 0


async def test_schema_drift_is_counted_and_logged_once(js, start_service) -> None:
    await ensure_input(js)
    columns = list(body("messages")["record"])
    svc = start_service(**{"routes.messages.columns": columns})
    for i in range(3):
        await feed(js, "cdc.acme.messages", body("messages", lsn=i + 1, message_id=f"m{i}", edited_at="2026-01-01"))
    assert await wait_count(js, OUTPUT, 3) == 3  # drift is reported, never a reason to hold an event back
    labels = {"table": "messages", "field_name": "edited_at"}
    await wait_until(lambda: svc.metric("cdc_consumer_unhandled_fields_total", labels) == 3, what="3 counted")
    drift = [r for r in svc.logs() if r.get("message", "").startswith("schema drift")]
    assert len(drift) == 1
    assert (drift[0]["table"], drift[0]["field_name"], drift[0]["change"]) == ("messages", "edited_at", "unexpected")
