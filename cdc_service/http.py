"""``/metrics``, ``/healthz`` (liveness) and ``/readyz`` (readiness) on one port, served from its own thread.

The server runs outside the event loop on purpose: a wedged loop must still be reported as unhealthy.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

Probe = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """Serves the probes. ``liveness`` and ``readiness`` return ``(ok, detail)``; detail is sent as JSON."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, liveness: Probe, readiness: Probe) -> None:
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _probe(liveness),
            "/livez": lambda: _probe(liveness),
            "/readyz": lambda: _probe(readiness),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    status, content_type, body = 404, "application/json", b'{"error": "not found"}'
                else:
                    status, content_type, body = route()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep logs quiet
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="cdc-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _probe(probe: Probe) -> tuple[int, str, bytes]:
    try:
        ok, detail = probe()
    except Exception as exc:  # a probe must answer, even about its own failure
        ok, detail = False, {"reason": f"probe failed: {type(exc).__name__}"}
    body = json.dumps({"status": "ok" if ok else "fail", **detail}).encode()
    return (200 if ok else 503), "application/json", body
