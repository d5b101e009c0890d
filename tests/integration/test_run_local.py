"""``make run`` (tools/run_local.py) on the layered settings: with nothing answering at the configured URLs it starts a
nats-server and a redis-server there, runs the service until Ctrl-C (SIGINT), then stops those servers by pid.

It runs from a copy of the repository's files it uses, so its `.run/` data and logs stay in the test's directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import urllib.request
from pathlib import Path

from tests.servers import REPO, Process, free_port, running, wait_for


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _checkout(root: Path) -> Path:
    shutil.copytree(REPO / "cdc_service", root / "cdc_service", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "tools").mkdir()
    for name in ("run_local.py", "localservers.py", "polling.py"):
        shutil.copy(REPO / "tools" / name, root / "tools" / name)
    for name in ("settings.toml", ".secrets.toml"):
        shutil.copy(REPO / name, root / name)
    return root


def test_make_run_starts_the_missing_servers_and_stops_them(tmp_path: Path) -> None:
    checkout = _checkout(tmp_path / "repo")
    nats_port, redis_port, http_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_") and not k.endswith("_FOR_DYNACONF")}
    env |= {
        "CDC_NATS__URL": f"nats://127.0.0.1:{nats_port}",
        "CDC_REDIS__URL": f"redis://127.0.0.1:{redis_port}/0",
        "CDC_HTTP__HOST": "127.0.0.1",
        "CDC_HTTP__PORT": str(http_port),
        "CDC_SHUTDOWN__GRACE_SECONDS": "5",
        "PYTHONUNBUFFERED": "1",
    }
    run = Process([sys.executable, "tools/run_local.py"], tmp_path / "run_local.log", env, checkout)
    with running(run):
        wait_for(lambda: not run.alive() or _ready(http_port), 60, what="service ready")
        assert run.alive(), run.output()[-3000:]
        run.signal(signal.SIGINT)
        assert run.wait(timeout=30) == 0, run.output()[-3000:]
    out = run.output()
    started = {int(p) for p in re.findall(r"run_local: started \S+ \(pid (\d+)\) on 127\.0\.0\.1", out)}
    stopped = {int(p) for p in re.findall(r"run_local: stopped pid (\d+)", out)}
    assert len(started) == 2, out[-3000:]
    assert stopped == started, out[-3000:]
    assert all(_gone(pid) for pid in started)
    assert (checkout / ".run" / "nats-server.log").exists()
