"""The ``python -m cdc_service`` process: a bad setting stops start-up with status 2 and one line naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.servers import REPO, free_port, service_env


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"ingest.subject_layout": "cdc.{tenant}.{table}"}, "ingest.subject_layout"),
        ({"redis.url": "redis://host:notaport"}, "redis.url"),
        ({"redis.url": "redis://user:s3cret-pw@host:notaport"}, "redis.url"),
        ({"workers.pool_size": "many"}, "workers.pool_size"),
        ({"ingest.mode": "sideways"}, "ingest.mode"),
    ],
    ids=["subject_layout", "redis_url", "redis_url_with_password", "pool_size", "ingest_mode"],
)
def test_bad_setting_stops_start_up(nats_server, redis_server, overrides: dict[str, str], key: str) -> None:
    env = service_env(nats_server.url, redis_server.url, free_port(), **overrides)
    result = subprocess.run(
        [sys.executable, "-m", "cdc_service"], env=env, cwd=REPO, capture_output=True, timeout=30, check=False
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, (result.returncode, stderr, result.stdout[-2000:])
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert key in lines[0], stderr
    assert "Traceback" not in stderr
    assert "s3cret-pw" not in stderr  # a password in a bad URL is masked in the error line
    assert result.stdout == b""  # nothing started, nothing logged


def test_sigterm_while_nats_is_unreachable_exits_at_once(workdir, redis_server) -> None:
    """Start-up waits for NATS (alive, not ready) but never stops the process from answering SIGTERM."""
    import json
    import signal
    import time

    from tests.servers import ServiceProcess, wait_for

    svc = ServiceProcess(workdir, f"nats://127.0.0.1:{free_port()}", redis_server.url, name="unreachable")
    svc.start()
    try:

        def alive_not_ready() -> bool:
            ready_status, ready_body = svc.get("/readyz")
            return svc.get("/healthz")[0] == 200 and ready_status == 503 and bool(json.loads(ready_body)["reason"])

        wait_for(alive_not_ready, 20, what="alive but not ready")
        svc.signal(signal.SIGTERM)
        started = time.monotonic()
        assert svc.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        svc.stop()
