"""Two watches of a NATS connection that looks up but is not, both on the loop thread (which owns the connection):
``ReadLoopWatch`` notices that nats-py's read loop ended and reconnects; ``PingWatch`` notices a frozen nats-server.
Their findings are facts for the probes (``cdc_service.health``)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from nats.aio.client import Client

from cdc_service.adapters.nats_jetstream import read_loop_stopped, restart_reading
from cdc_service.metrics import Metrics


class Activity(Protocol):
    """What ``PingWatch`` needs of the engine: when something last moved, and how much is in flight."""

    @property
    def last_received(self) -> float: ...

    @property
    def last_settled(self) -> float: ...

    @property
    def inflight(self) -> int: ...


class ReadLoopWatch:
    """A connection whose read loop has ended receives nothing while looking connected. ``check`` (called every
    loop tick) reconnects at once, which starts a new read loop, once per episode; ``stopped_at`` is when the episode
    began (``clock`` time; None while the read loop runs): readiness fails at once, liveness if it lasts."""

    def __init__(
        self,
        nc: Client,
        log: logging.Logger,
        *,
        clock: Callable[[], float] = time.monotonic,
        restart: Callable[[Client], Coroutine[Any, Any, None]] = restart_reading,
    ) -> None:
        self._nc = nc
        self._log = log
        self._clock = clock
        self._restart = restart
        self.stopped_at: float | None = None
        self.restarting: asyncio.Task[None] | None = None  # kept referenced until done

    def check(self, *, stopping: bool = False) -> None:
        """Must run on the loop thread, inside its running loop; never blocks. While stopping nothing is restarted."""
        if stopping or not read_loop_stopped(self._nc):
            self.stopped_at = None
            return
        if self.stopped_at is None:
            self.stopped_at = self._clock()
            self._log.error("the NATS read loop stopped; reconnecting")
            loop = asyncio.get_running_loop()
            self.restarting = loop.create_task(self._restart(self._nc), name="cdc-restart-read")


class PingWatch:
    """Readiness must not trust the connection while nothing moves: a frozen nats-server keeps the TCP link up and
    nats-py notices only after ``ping_interval * max_outstanding_pings``. So when nothing was received or acked for
    ``timeout`` seconds, ``run`` pings; no answer within that time sets ``problem`` (the replica is not ready) until
    one comes."""

    def __init__(
        self,
        nc: Client,
        activity: Activity,
        metrics: Metrics,
        log: logging.Logger,
        timeout: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._nc = nc
        self._activity = activity
        self._metrics = metrics
        self._log = log
        self._timeout = timeout
        self._clock = clock
        self._sleep = sleep
        self.problem: str | None = None

    async def run(self) -> None:
        """Check every second (or every ``timeout``, if shorter) until cancelled."""
        while True:
            await self._sleep(min(1.0, self._timeout))
            await self.check()

    async def check(self) -> None:
        if not self._nc.is_connected:
            self.problem = None  # readiness reports the disconnection itself
            return
        activity, timeout = self._activity, self._timeout
        quiet = self._clock() - max(activity.last_received, activity.last_settled)
        if quiet < timeout:
            self.problem = None
            return
        try:
            await self._nc.flush(timeout=math.ceil(timeout))  # nats-py takes whole seconds
        except asyncio.CancelledError:
            raise
        except Exception:
            if self.problem is None:
                self._log.error(
                    "nats-server does not answer pings; not ready",
                    extra={"ping_timeout": timeout, "quiet_seconds": round(quiet, 1), "inflight": activity.inflight},
                )
                self._metrics.nats_connected.set(0)
            self.problem = (
                f"nats-server did not answer a ping within {timeout:g}s; nothing received or acked for {quiet:.0f}s"
            )
        else:
            if self.problem is not None:
                self._log.info("nats-server answers pings again")
                self._metrics.nats_connected.set(1)
            self.problem = None


class ConnectionEvents:
    """nats-py's connection callbacks: the ``nats_connected`` gauge, the reconnect count and their log lines. nats-py
    reconnects forever, so a connection closed while the service is not stopping (``stopping()`` is false) means
    something final (credentials revoked, say): ``on_lost`` ends the service, and the orchestrator restarts the pod
    rather than let it run without a connection."""

    def __init__(
        self, metrics: Metrics, log: logging.Logger, stopping: Callable[[], bool], on_lost: Callable[[], None]
    ) -> None:
        self._metrics = metrics
        self._log = log
        self._stopping = stopping
        self._on_lost = on_lost

    async def disconnected(self) -> None:
        self._metrics.nats_connected.set(0)
        if not self._stopping():
            self._log.warning("disconnected from NATS, reconnecting")

    async def reconnected(self) -> None:
        self._metrics.nats_connected.set(1)
        self._metrics.nats_reconnects.inc()
        self._log.info("reconnected to NATS")

    async def closed(self) -> None:
        self._metrics.nats_connected.set(0)
        if not self._stopping():
            self._log.critical("NATS connection closed for good; exiting")
            self._on_lost()
