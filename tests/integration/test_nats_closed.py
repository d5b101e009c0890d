"""A NATS connection closed for good while running ends the process with a non-zero exit code.

nats-py 2.16 with ``max_reconnect_attempts=-1`` never gives up on reconnecting: a stopped server, or one restarted
with auth the client cannot pass, is retried forever (auth errors during a reconnect are caught and retried). What
it does treat as final is a ``-ERR`` the server sends on a live connection (``Client._process_err``: anything but a
stale connection or a permissions error closes the client). A real server sends one when a config reload adds
authorization the connected client no longer satisfies: ``-ERR 'Authorization Violation'``, then the client closes.
This test uses its own nats-server (with a config file to reload), so the session server is left untouched.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.servers import NatsServer, RedisServer, ServiceProcess, wait_for


def test_process_exits_non_zero_when_the_connection_is_closed_for_good(
    workdir: Path, redis_server: RedisServer
) -> None:
    if not redis_server.alive():
        redis_server.start()
    conf = workdir / "nats-closed.conf"
    conf.write_text("# no authorization yet\n")
    server = NatsServer(workdir, extra=["-c", str(conf)])
    server.start()
    service = ServiceProcess(workdir, server.url, redis_server.url, name="closed", **{"nats.reconnect_wait": 0.1})
    try:
        service.start()
        service.wait_ready()
        assert service.metric("cdc_consumer_nats_connected") == 1

        conf.write_text("authorization { user: someone, password: else }\n")
        os.kill(server.pid, signal.SIGHUP)  # reload: the server drops the now unauthorised client with -ERR

        code = service.wait(timeout=30)
        assert code == 1, service.output()[-3000:]
        assert any(line.get("message") == "NATS connection closed for good; exiting" for line in service.logs())
        assert server.alive()  # the server did not go away: the client closed for good
    finally:
        service.stop()
        server.stop()


def test_a_stopped_server_is_not_final(workdir: Path, redis_server: RedisServer) -> None:
    """The counterpart: while the server is down the service keeps retrying and recovers when it is back."""
    if not redis_server.alive():
        redis_server.start()
    server = NatsServer(workdir)
    server.start()
    service = ServiceProcess(workdir, server.url, redis_server.url, name="outage", **{"nats.reconnect_wait": 0.1})
    try:
        service.start()
        service.wait_ready()
        server.stop()
        wait_for(lambda: service.get("/readyz")[0] == 503, 15, what="unready while NATS is down")
        server.start()  # same port and store
        service.wait_ready(30)
        assert service.alive()
    finally:
        service.stop()
        server.stop()
