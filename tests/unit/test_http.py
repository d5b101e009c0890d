"""The probe server's own limits, in process with real sockets: the connection cap and unknown paths and methods."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from cdc_service.http import HealthServer
from tests.servers import wait_for


@pytest.fixture
def server() -> Iterator[HealthServer]:
    http = HealthServer(
        "127.0.0.1", 0, CollectorRegistry(), lambda: (True, {}), lambda: (False, {"reason": "x"}), max_connections=3
    )
    http.start()
    yield http
    http.stop()


def _get(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_connections_past_the_cap_are_closed_unanswered(server: HealthServer) -> None:
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    wait_for(lambda: server._open == 3, what="three connections open")
    extra = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
    try:
        answer = extra.recv(100)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    assert server.refused == 1
    for sock in held:
        sock.close()
    extra.close()
    wait_for(lambda: server._open == 0, what="connections released")
    assert _get(server.port, "/health") == 200


def test_paths_and_methods(server: HealthServer) -> None:
    assert _get(server.port, "/healthz?verbose=1") == 200
    assert _get(server.port, "/readyz") == 503
    assert _get(server.port, "/nope") == 404
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"POST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 405 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")


def test_a_server_never_started_stops_cleanly() -> None:
    http = HealthServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, {}), lambda: (True, {}))
    http.stop()
