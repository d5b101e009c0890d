"""Wiring and lifecycle: the main thread owns signals and shutdown, one background thread owns the event loop
(and with it every NATS object), a thread pool does the per-batch work, another thread serves HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from cdc_service import __version__
from cdc_service.adapters.nats_jetstream import (
    ConnectionState,
    PipelinedPublisher,
    ProvisioningError,
    PullIntake,
    PushIntake,
    connect,
    consumer_config,
    consumer_drift,
    ensure_consumer,
    provision,
    read_loop_stopped,
    restart_reading,
)
from cdc_service.adapters.nats_partitions import PartitionedIntake, ensure_partitioned_stream
from cdc_service.adapters.redis_dedup import RedisDedupStore
from cdc_service.advisories import MaxDeliveriesWatcher
from cdc_service.config import Settings, mask_url
from cdc_service.core.events import EventBuilder
from cdc_service.core.partitions import MIN_SERVER, member_id, supports_partitions
from cdc_service.engine import Engine
from cdc_service.http import HealthServer
from cdc_service.metrics import Metrics, register_runtime_collectors
from cdc_service.worker import BatchPreparer

log = logging.getLogger("cdc_service.service")
T = TypeVar("T")

_LOOP_STALE_AFTER = 10.0
_REDIS_PROBE_PERIOD = 2.0
_STREAM_NOT_FOUND = 10059  # JetStream API error code; 10014 is "consumer not found"


class UnsupportedServer(RuntimeError):
    """A setting needs a newer nats-server; like a bad setting, this ends start-up with status 2."""


def available_cpus() -> int:
    """CPUs this process may use: the cgroup v2 quota when one is set (a container's CPU limit), else the CPUs it
    may be scheduled on. ``os.cpu_count()`` would size the pool for the whole node."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()  # noqa: SIM115 (tiny, read once)
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # optional: the service is correct on the stdlib loop, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def interval_figures(
    current: Counter[str], previous: Counter[str], seconds: float, lag: float | None, backlog: int | None
) -> dict[str, Any]:
    """The summary line's figures for the interval since the previous one: counts and rates per second of handled
    messages and of published events, the latest lag (source commit to PubAck) and the backlog."""
    handled = sum(current.values()) - sum(previous.values())
    published = current["published"] - previous["published"]
    seconds = max(seconds, 1e-9)
    return {
        "interval_seconds": round(seconds, 1),
        "interval_handled": handled,
        "interval_published": published,
        "interval_dead_lettered": current["dead_lettered"] - previous["dead_lettered"],
        "handled_per_second": round(handled / seconds, 1),
        "published_per_second": round(published / seconds, 1),
        "lag_seconds": None if lag is None else round(lag, 3),
        "backlog": backlog,
    }


class Service:
    """One replica. ``run()`` blocks in the main thread until SIGTERM/SIGINT or a fatal error; returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        if settings.ingest.ordering == "partitioned":
            # No Redis claims: the pin gives each partition one owner, and a claim left by an owner that died makes
            # its successor publish that event after newer ones of the same chat (a claimed copy is published
            # outside the receipt order, once the claim expires). docs/system_architecture.md §9.1.
            settings = dataclasses.replace(settings, dedup=dataclasses.replace(settings.dedup, claim_ttl=0.0))
        self.settings = settings
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        register_runtime_collectors(self.registry)
        self.pool_size = settings.workers.resolved_pool_size(available_cpus())
        self.metrics.pool_size.set(self.pool_size)
        self.metrics.declare_tables(settings.routes)
        self._stop = threading.Event()
        self._exit_code = 0
        self._stopping = False
        self._ready = False
        self._loop_tick = time.monotonic()
        self._unhealthy = False  # liveness already reported failing (log the critical line once per episode)
        self._read_loop_stopped_at: float | None = None  # when nats-py's read loop was first seen ended
        self._loop = _new_loop()
        self._loop_thread = threading.Thread(target=self._run_loop, name="cdc-loop", daemon=True)
        self._executor = ThreadPoolExecutor(self.pool_size, thread_name_prefix="cdc-worker")
        self.dedup = RedisDedupStore(
            settings.redis,
            settings.dedup,
            pool_size=self.pool_size,
            on_error=lambda op: self.metrics.redis_errors.labels(op).inc(),
        )
        self._nc: Client | None = None
        self._nats_state = ConnectionState(settings.nats)
        self._js: JetStreamContext | None = None
        self._consumer_problem: str | None = None  # set by the consumer watchdog while the durable is gone
        self._nats_problem: str | None = None  # set while nats-server does not answer pings (see _probe_nats)
        self._ack_floor = 0  # highest consumer ack floor seen: where a recreated durable resumes
        self._backlog: int | None = None  # the durable's num_pending at the last consumer check
        self._intake: PushIntake | PullIntake | PartitionedIntake | None = None
        self._advisories: MaxDeliveriesWatcher | None = None
        self.engine: Engine | None = None
        self._background: list[asyncio.Task[None]] = []
        self._tick_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self.http = HealthServer(
            settings.http.host,
            settings.http.port,
            self.registry,
            self.liveness,
            self.readiness,
            read_timeout=settings.http.read_timeout,
            max_connections=settings.http.max_connections,
        )

    # ---------------------------------------------------------------------------------------------- main thread

    def run(self) -> int:
        self._install_signal_handlers()
        self.http.start()
        self._loop_thread.start()
        log.info(
            "starting",
            extra={
                "version": __version__,
                "nats": [mask_url(u) for u in self.settings.nats.url],
                "redis": mask_url(self.settings.redis.url),
                "mode": self.settings.ingest.mode,
                "ordering": self.settings.ingest.ordering,
                "pool_size": self.pool_size,
                "batch_size": self.settings.ingest.batch_size,
                "http_port": self.http.port,
            },
        )
        # Start-up runs on the loop while this thread keeps answering signals: until NATS answers (nats-py retries
        # the first connection forever here) the pod is alive but not ready, and SIGTERM still ends it at once.
        startup = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        while not startup.done() and not self._stop.wait(0.1):
            pass
        if not startup.done():
            startup.cancel()
        elif startup.exception() is not None:
            exc = startup.exception()
            if isinstance(exc, UnsupportedServer):
                print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
                self._exit_code = 2
            elif isinstance(exc, (ConnectionError, ProvisioningError)):
                log.critical("cannot start: %s", exc)
            else:
                log.critical("cannot start", exc_info=exc)
            self._exit_code = self._exit_code or 1
            self._stop.set()
        else:
            log.info(
                "consuming", extra={"stream": self.settings.ingest.stream, "consumer": self.settings.ingest.durable}
            )
        while not self._stop.wait(0.5):
            pass
        self._shutdown()
        return self._exit_code

    def _install_signal_handlers(self) -> None:
        def handle(signum: int, _frame: Any) -> None:
            if self._stop.is_set() and signum == signal.SIGINT:
                os._exit(130)  # a second Ctrl-C: the operator does not want to wait for the drain
            log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
            self._stop.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)

    def _shutdown(self) -> None:
        grace = self.settings.shutdown.grace_seconds
        # Finish work until the deadline minus a reserve, which pays for the naks of what is left and the close.
        work_deadline = time.monotonic() + grace - min(3.0, grace / 3)
        self._stopping = True
        self._ready = False
        try:
            self._call(self._stop_async(work_deadline), timeout=grace)
        except Exception:
            log.exception("shutdown did not complete cleanly")
            self._exit_code = self._exit_code or 1
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.http.stop()
        self.dedup.close()
        log.info("stopped", extra={"exit_code": self._exit_code, **self._totals()})

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        # Both run from the loop's first moment: liveness and Redis state must not wait for NATS.
        self._tick_task = self._loop.create_task(self._tick(), name="cdc-tick")
        self._probe_task = self._loop.create_task(self._probe_redis(), name="cdc-redis-probe")
        self._loop.run_forever()

    # ---------------------------------------------------------------------------------------------- probes

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """The panic guard: fails when the loop is wedged or work is stuck; the first failure is logged critically,
        so the restart the orchestrator is about to do has its reason in the log."""
        now = time.monotonic()
        reason = ""
        stopped_at = self._read_loop_stopped_at
        if now - self._loop_tick > _LOOP_STALE_AFTER:
            reason = f"event loop has not run for {now - self._loop_tick:.0f}s"
        elif stopped_at is not None and now - stopped_at > _LOOP_STALE_AFTER:
            reason = f"the NATS read loop stopped {now - stopped_at:.0f}s ago and reconnecting has not restarted it"
        elif self.engine is not None and self.engine.stalled(now):
            engine = self.engine
            reason = f"{engine.inflight} messages pending and nothing acked for {now - engine.last_settled:.0f}s"
        if not reason:
            self._unhealthy = False
            return True, {}
        if not self._unhealthy:
            self._unhealthy = True
            log.critical("liveness failing: %s", reason)
        return False, {"reason": reason}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        redis_state = "ok" if self.dedup.available else "degraded"
        detail: dict[str, Any] = {"redis": redis_state}
        nc = self._nc
        if self._stopping:
            return False, {**detail, "reason": "shutting down"}
        if nc is None:
            return False, {**detail, "reason": self._nats_state.describe()}
        if not nc.is_connected:
            return False, {**detail, "reason": f"not connected to NATS: {self._nats_state.describe()}"}
        if self._read_loop_stopped_at is not None:
            return False, {**detail, "reason": "NATS read loop stopped"}
        if not self._ready:
            return False, {**detail, "reason": "starting: connected to NATS, provisioning streams and the consumer"}
        if self._intake is None or not self._intake.active:
            return False, {**detail, "reason": "not bound to the consumer"}
        if self._consumer_problem is not None:
            return False, {**detail, "reason": self._consumer_problem}
        if self._nats_problem is not None:
            return False, {**detail, "reason": self._nats_problem}
        detail["nats"] = "connected"
        if redis_state == "degraded":
            detail["redis_detail"] = self.dedup.problem or "degraded"
        return True, detail

    # ---------------------------------------------------------------------------------------------- loop thread

    async def _start(self) -> None:
        settings = self.settings
        self._nc = await connect(
            settings.nats,
            on_disconnected=self._on_disconnected,
            on_reconnected=self._on_reconnected,
            on_closed=self._on_closed,
            state=self._nats_state,
        )
        self.metrics.nats_connected.set(1)
        partitioned = settings.ingest.ordering == "partitioned"
        version = str(self._nc._server_info.get("version", ""))
        if partitioned and not supports_partitions(version):
            raise UnsupportedServer(
                f"ingest.ordering: partitioned needs nats-server {'.'.join(map(str, MIN_SERVER))} or newer "
                f"(pull-consumer priority groups); the server is {version or 'of unknown version'}"
            )
        js = self._js = self._nc.jetstream(timeout=10)
        consumer = await provision(js, settings)
        if partitioned:
            await ensure_partitioned_stream(js, settings)
        publisher = PipelinedPublisher(self._nc)
        await publisher.start()
        builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
        prepare = BatchPreparer(builder, self.dedup, self.metrics, max_deliver=settings.ingest.max_deliver)
        self.engine = Engine(settings, prepare, self.dedup, publisher, self._executor, self.metrics)
        await self.engine.start()
        if settings.dlq.enabled and not partitioned:
            self._advisories = MaxDeliveriesWatcher(
                js, settings, prepare, self.dedup, publisher, self._executor, self.metrics
            )
            await self._advisories.start()
        if partitioned:
            member = member_id(socket.gethostname(), os.getpid())
            partitions = PartitionedIntake(self._nc, js, settings, self.metrics, member)
            await partitions.start(self.engine.on_batch)
            self._intake = partitions
        elif settings.ingest.mode == "pull":
            pull = PullIntake(js, settings.ingest)
            await pull.start(self.engine.on_batch)
            self._intake = pull
        else:
            push = PushIntake(js, settings.ingest, consumer)
            await push.start(self.engine.on_message)
            self._intake = push
        self._background = [
            asyncio.create_task(self._summarise(), name="cdc-summary"),
            asyncio.create_task(self._probe_nats(), name="cdc-nats-probe"),
        ]
        if not partitioned:  # each partition's puller recreates its own durable
            self._background.append(asyncio.create_task(self._watch_consumer(), name="cdc-consumer-watchdog"))
        self._ready = True

    async def _stop_async(self, deadline: float) -> None:
        # Order matters: stop intake, finish in-flight work (publish, mark, ack), then flush and close. Draining the
        # connection first would also drain the PubAck inbox and fail the work still in flight.
        if self.engine is not None:
            self.engine.release_intake()
        if self._intake is not None:
            await self._intake.stop()
        if self._advisories is not None:
            await self._advisories.stop()
        if self.engine is not None:
            await self.engine.drain(deadline)
        tasks = [t for t in (*self._background, self._tick_task, self._probe_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # let them finish cancelling before the loop stops
        nc = self._nc
        if nc is not None and not nc.is_closed:
            try:
                await nc.flush(timeout=2)
            except Exception:
                pass
            await nc.close()

    async def _tick(self) -> None:
        """Proves to the liveness probe that the loop runs; nothing here may block or wait on other work."""
        while True:
            self._loop_tick = time.monotonic()
            self._check_read_loop()
            await asyncio.sleep(1.0)

    def _check_read_loop(self) -> None:
        """A connection whose read loop has ended receives nothing while looking connected: reconnect at once (a new
        read loop), and fail readiness now and liveness if that does not help."""
        nc = self._nc
        if nc is None or self._stopping or not read_loop_stopped(nc):
            self._read_loop_stopped_at = None
            return
        if self._read_loop_stopped_at is None:
            self._read_loop_stopped_at = time.monotonic()
            log.error("the NATS read loop stopped; reconnecting")
            self._reconnecting = asyncio.get_running_loop().create_task(restart_reading(nc), name="cdc-restart-read")

    async def _probe_redis(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            up = await loop.run_in_executor(self._executor, self.dedup.probe)
            self.metrics.redis_up.set(1 if up else 0)
            await asyncio.sleep(_REDIS_PROBE_PERIOD)

    async def _probe_nats(self) -> None:
        """Readiness must not trust the connection while nothing moves: a frozen nats-server keeps the TCP link up
        and nats-py notices only after ``ping_interval * max_outstanding_pings``. So when nothing was received or
        acked for ``health.nats_ping_timeout``, ping; no answer within that time makes the replica not ready."""
        timeout = self.settings.health.nats_ping_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout))
            nc, engine = self._nc, self.engine
            if nc is None or engine is None or not nc.is_connected:
                self._nats_problem = None  # readiness reports the disconnection itself
                continue
            quiet = time.monotonic() - max(engine.last_received, engine.last_settled)
            if quiet < timeout:
                self._nats_problem = None
                continue
            try:
                await nc.flush(timeout=math.ceil(timeout))  # nats-py takes whole seconds
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._nats_problem is None:
                    log.error(
                        "nats-server does not answer pings; not ready",
                        extra={"ping_timeout": timeout, "quiet_seconds": round(quiet, 1), "inflight": engine.inflight},
                    )
                    self.metrics.nats_connected.set(0)
                self._nats_problem = (
                    f"nats-server did not answer a ping within {timeout:g}s; nothing received or acked for {quiet:.0f}s"
                )
            else:
                if self._nats_problem is not None:
                    log.info("nats-server answers pings again")
                    self.metrics.nats_connected.set(1)
                self._nats_problem = None

    async def _watch_consumer(self) -> None:
        """Recreate the durable if someone deletes it while we run, and restore its configuration if someone edits
        it; without this the replica idles forever or skips events for good."""
        while True:
            await asyncio.sleep(self.settings.ingest.consumer_check_interval)
            try:
                await self._check_consumer()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, timeout: nothing to decide now, ask again next period
                log.debug("consumer check failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})

    async def _check_consumer(self) -> None:
        ingest, js = self.settings.ingest, self._js
        assert js is not None
        try:
            info = await js.consumer_info(ingest.stream, ingest.durable)
            drift = consumer_drift(consumer_config(ingest), info.config)
            if drift:
                await self._restore_consumer(drift)
                return
            # Only an ack floor reached under the configured filter is a safe place to resume from.
            self._ack_floor = max(self._ack_floor, int(info.ack_floor.stream_seq or 0))
            self.metrics.ack_floor.set(self._ack_floor)
            self._backlog = int(info.num_pending or 0)
            self.metrics.backlog.set(self._backlog)
            self._consumer_problem = None
            return
        except NotFoundError as exc:
            if exc.err_code == _STREAM_NOT_FOUND:
                # Streams are only created at start-up: a stream deleted under us is an operator's decision.
                self._consumer_problem = "input stream missing"
                log.error("input stream is missing; not recreating it", extra={"stream": ingest.stream})
                return
        self._consumer_problem = "consumer missing"
        log.warning("durable consumer is missing; recreating it", extra={"consumer": ingest.durable})
        # Resume after the last ack floor this replica saw: everything up to it was acked; what follows and was
        # already published comes again and is dropped by the dedup windows (Redis TTL, JetStream's window).
        await ensure_consumer(js, ingest, resume_after=self._ack_floor)
        # No re-bind in either mode: push keeps its core subscription on the fixed deliver subject and queue group,
        # which the new consumer delivers to; pull fetches by durable name. tests/integration/
        # test_consumer_recreated.py proves both keep receiving.
        self.metrics.consumer_recreated.inc()
        self._consumer_problem = None
        log.info("durable consumer recreated", extra={"consumer": ingest.durable})

    async def _restore_consumer(self, drift: list[str]) -> None:
        """Bring an edited durable back to the settings.

        A changed filter let the durable's floor move past the events it no longer matched: those would be skipped
        for good, so the durable is recreated to resume after the last ack floor seen under the configured filter
        (what comes again and was already published is dropped by the dedup windows). Other fields are updated in
        place, which keeps the delivery state.
        """
        ingest, js = self.settings.ingest, self._js
        assert js is not None
        for name in drift:
            self.metrics.consumer_drift.labels(name).inc()
        log.critical(
            "the durable consumer's configuration was changed outside this service; restoring the settings",
            extra={"consumer": ingest.durable, "fields": drift, "resume_after": self._ack_floor},
        )
        if "filter_subjects" in drift:
            await js.delete_consumer(ingest.stream, ingest.durable)
            await ensure_consumer(js, ingest, resume_after=self._ack_floor)
        else:
            await ensure_consumer(js, ingest)
        log.info("durable consumer restored", extra={"consumer": ingest.durable, "fields": drift})

    async def _summarise(self) -> None:
        previous: Counter[str] = Counter()
        since = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.log.summary_interval)
            now = time.monotonic()
            extra = self._totals()
            if self.engine is not None:
                current = Counter(self.engine.totals)
                extra.update(interval_figures(current, previous, now - since, self.engine.lag, self._backlog))
                previous, since = current, now
            log.info("summary", extra=extra)

    def _totals(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None:
            return {}
        return {
            **dict(engine.totals),
            "inflight": engine.inflight,
            "redis": "ok" if self.dedup.available else "degraded",
            **({"redis_detail": self.dedup.problem} if self.dedup.problem else {}),
        }

    async def _on_disconnected(self) -> None:
        self.metrics.nats_connected.set(0)
        if not self._stopping:
            log.warning("disconnected from NATS, reconnecting")

    async def _on_reconnected(self) -> None:
        self.metrics.nats_connected.set(1)
        self.metrics.nats_reconnects.inc()
        log.info("reconnected to NATS")

    async def _on_closed(self) -> None:
        self.metrics.nats_connected.set(0)
        if not self._stopping:
            # Reconnects never stop, so a closed connection means something final (e.g. auth revoked): exit
            # non-zero and let the orchestrator restart the pod rather than run without a connection.
            log.critical("NATS connection closed for good; exiting")
            self._exit_code = 1
            self._stop.set()
