"""``python -m cdc_service`` processes for tests, on free loopback ports, and what the tests import with them.

The servers, ``Process`` and ``free_port`` come from the one launcher (``tools/localservers.py``), polling from
``tools/polling.py``; both are re-exported here. Every process is stopped by its pid. Waiting is always polling with a
deadline, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tools.localservers import (
    REPO,
    MissingBinary,
    NatsServer,
    Process,
    ProcessSet,
    RedisServer,
    Server,
    answers,
    binary,
    free_port,
    running,
)
from tools.polling import GiveUp, wait_for, wait_for_async

__all__ = [
    "REPO",
    "GiveUp",
    "MissingBinary",
    "NatsServer",
    "Process",
    "ProcessSet",
    "RedisServer",
    "Server",
    "ServiceProcess",
    "answers",
    "binary",
    "free_port",
    "run_cli",
    "running",
    "service_env",
    "wait_for",
    "wait_for_async",
]


def run_cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m cdc_service ARGS`` run to completion in ``cwd`` with ``env`` on top of a clean environment (no
    inherited ``CDC_*`` or dynaconf variables); this checkout is importable from any ``cwd``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CDC_") and not k.endswith("_FOR_DYNACONF")}
    environ |= {"PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "cdc_service", *args], cwd=cwd, env=environ, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def service_env(nats_url: str, redis_url: str, http_port: int, **overrides: Any) -> dict[str, str]:
    """Environment for ``python -m cdc_service``: the test's servers and short timings, plus ``overrides``.

    ``overrides`` use dotted setting names: ``{"ingest.ack_wait": 2}`` becomes ``CDC_INGEST__ACK_WAIT=2``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_") and k != "SETTINGS_FILES_FOR_DYNACONF"}
    env.update(
        {
            "CDC_NATS__URL": nats_url,
            "CDC_REDIS__URL": redis_url,
            "CDC_HTTP__PORT": str(http_port),
            "CDC_HTTP__HOST": "127.0.0.1",
            "CDC_SHUTDOWN__GRACE_SECONDS": "10",
            "CDC_LOG__LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key, value in overrides.items():
        name = "CDC_" + key.upper().replace(".", "__")
        env[name] = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
    return env


class ServiceProcess(Process):
    """``python -m cdc_service``. ``new_session``: its own session and process group, for a process a test freezes
    (SIGSTOP): no signal meant for the test run's group reaches it. In particular, when the shell that started the
    run exits while the process is stopped, the group becomes orphaned with a stopped member, and the kernel sends
    every member SIGHUP then SIGCONT (POSIX job control): the frozen replica would resume on its own."""

    def __init__(
        self,
        workdir: Path,
        nats_url: str,
        redis_url: str,
        name: str = "svc",
        *,
        new_session: bool = False,
        **overrides: Any,
    ):
        self.http_port = free_port()
        env = service_env(nats_url, redis_url, self.http_port, **overrides)
        log = workdir / f"{name}-{self.http_port}.log"
        super().__init__([sys.executable, "-m", "cdc_service"], log, env, REPO, new_session=new_session)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise GiveUp(f"service exited: {self.output()[-3000:]}")
            return self.get("/readyz")[0] == 200

        wait_for(ready, timeout, 0.05, what="service ready")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Sum of the ``/metrics`` samples named ``name`` whose labels include ``labels`` (0 when none)."""
        from prometheus_client.parser import text_string_to_metric_families

        _, body = self.get("/metrics")
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += float(sample.value)
        return total

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.output().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        return lines
