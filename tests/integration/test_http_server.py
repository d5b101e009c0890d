"""The probe and metrics port of the real ``python -m cdc_service`` under hostile clients: hundreds of idle or
half-sent connections, clients that hang up early, a port already taken."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.servers import ServiceProcess, wait_for

HOLDERS = 300


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


@pytest.fixture
def sockets() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_probes_answer_under_300_idle_and_half_sent_connections(start_service, sockets: ExitStack) -> None:
    svc = start_service(**{"http.read_timeout": 2, "log.level": "DEBUG"})
    holders = []
    for i in range(HOLDERS):
        sock = sockets.enter_context(_open(svc.http_port))
        if i % 2:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        holders.append(sock)

    for path in ("/healthz", "/health", "/livez", "/readyz", "/metrics"):
        status, _ = svc.get(path)
        assert status == 200, path

    # Nobody holds a connection longer than http.read_timeout: the server closes idle and half-sent ones.
    for sock in holders:
        sock.settimeout(10)
    assert all(_closed_by_server(sock) for sock in holders)
    assert svc.alive()


def test_client_that_hangs_up_early_gets_one_json_debug_line(start_service) -> None:
    svc = start_service(**{"log.level": "DEBUG"})
    for _ in range(20):
        sock = _open(svc.http_port)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        # SO_LINGER 0: close with a reset, like a scraper giving up on its timeout.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert svc.get("/healthz")[0] == 200
    wait_for(
        lambda: any(line.get("message", "").startswith("http client") for line in svc.logs()),
        what="a debug line about the early hang-up",
    )
    svc.stop()
    lines = svc.output().splitlines()
    not_json = []
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not_json == [], "\n".join(not_json[:20])
    hang_ups = [line for line in svc.logs() if line.get("message", "").startswith("http client")]
    assert all(line["level"] == "DEBUG" for line in hang_ups)


def test_port_in_use_names_the_setting(workdir, nats_server, redis_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = ServiceProcess(workdir, nats_server.url, redis_server.url, name="port-taken")
        service.env = {**(service.env or {}), "CDC_HTTP__PORT": str(port)}
        service.start()
        assert service.wait(timeout=30) == 1
    lines = [line for line in service.logs() if line.get("level") == "CRITICAL"]
    assert len(lines) == 1, service.output()
    assert "http.port" in lines[0]["message"]
    assert "Address already in use" in lines[0]["message"]


def test_runtime_metrics_on_metrics(start_service) -> None:
    svc = start_service()
    assert svc.metric("process_resident_memory_bytes") > 0
    assert svc.metric("process_cpu_seconds_total") > 0
    assert svc.metric("python_info") == 1
    _, body = svc.get("/metrics")
    assert b"python_gc_collections_total" in body
    assert b"cdc_consumer_events_total" in body
