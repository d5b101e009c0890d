"""``/metrics``, ``/healthz`` (liveness; also ``/health`` and ``/livez``) and ``/readyz`` (readiness) on one port.

The server runs on its own thread with its own asyncio loop, outside the service's event loop on purpose: a wedged
service loop must still be reported as unhealthy. An idle or half-sent connection costs a few kilobytes here, not a
thread: every connection gets ``read_timeout`` seconds to send its request (and to take the answer), and at most
``max_connections`` are open at once; past that, new ones are closed at once. One request per connection
(``Connection: close``), which is all probes and Prometheus need.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, dict[str, Any]]]
Answer = tuple[int, str, bytes]

log = logging.getLogger("cdc_service.http")

_MAX_REQUEST_HEAD = 8192  # request line and headers; a probe or a scrape sends a few hundred bytes


class HealthServer:
    """Serves the probes. ``liveness`` and ``readiness`` return ``(ok, detail)``; detail is sent as JSON.

    The constructor only stores; ``start()`` binds the port (a port in use raises ``OSError`` there, before the
    serving thread starts) and serves.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        liveness: Probe,
        readiness: Probe,
        *,
        read_timeout: float = 5.0,
        max_connections: int = 512,
    ) -> None:
        self._routes: dict[str, Callable[[], Answer]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _probe(liveness),
            "/health": lambda: _probe(liveness),
            "/livez": lambda: _probe(liveness),
            "/readyz": lambda: _probe(readiness),
        }
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._open = 0
        self.refused = 0  # connections closed unanswered because max_connections were open
        self._address = (host, port)
        self._socket: socket.socket | None = None
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="cdc-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (the one chosen for port 0), or the configured one before ``start()``."""
        if self._socket is None:
            return self._address[1]
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        """Bind, then serve on the server's own thread. Raises ``OSError`` when the address cannot be bound."""
        host, port = self._address
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._socket = socket.create_server((host, port), family=family, backlog=128)
        self._socket.setblocking(False)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; also right for a server that was never started."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._request_stop)
            self._thread.join(timeout=5)
        elif not self._loop.is_closed() and self._thread.ident is None:
            self._loop.close()
        if self._socket is not None:
            self._socket.close()

    def _request_stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        assert self._socket is not None  # bound by start() before this thread runs
        server = await asyncio.start_server(self._connection, sock=self._socket, limit=_MAX_REQUEST_HEAD)
        async with server:
            await self._stopped.wait()
        # Leaving the block closed the listener; connections still open end with the loop.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self._max_connections:
            self.refused += 1
            writer.transport.abort()
            return
        self._open += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), self._read_timeout)
        except TimeoutError:
            log.debug("http client too slow; connection closed", extra={"peer": _peer(writer), "path": ""})
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            # Probes and scrapers give up on their own timeouts; nothing to see beyond one quiet line.
            log.debug("http client disconnected early", extra={"peer": _peer(writer), "error": type(exc).__name__})
        except asyncio.LimitOverrunError:
            await _send(writer, (431, "application/json", b'{"error": "request head too large"}'))
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            await _send(writer, (400, "application/json", b'{"error": "bad request"}'))
            return
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            await _send(writer, (405, "application/json", b'{"error": "method not allowed"}'))
            return
        route = self._routes.get(target.split("?", 1)[0])
        answer = route() if route is not None else (404, "application/json", b'{"error": "not found"}')
        await _send(writer, answer, body=method == b"GET")


async def _send(writer: asyncio.StreamWriter, answer: Answer, *, body: bool = True) -> None:
    status, content_type, content = answer
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(content)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode("latin-1") + (content if body else b""))
    await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else ""


def _probe(probe: Probe) -> Answer:
    try:
        ok, detail = probe()
    except Exception as exc:  # a probe must answer, even about its own failure
        ok, detail = False, {"reason": f"probe failed: {type(exc).__name__}"}
    body = json.dumps({"status": "ok" if ok else "fail", **detail}).encode()
    return (200 if ok else 503), "application/json", body
