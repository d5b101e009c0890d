"""What an operator reads when something is wrong: the real ``python -m cdc_service`` process against a NATS that
refuses, a NATS host that never answers, a NATS that comes back; and the console log format."""

from __future__ import annotations

import json
import socket
from typing import Any

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
