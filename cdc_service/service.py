"""Wiring and lifecycle: the main thread owns signals and shutdown, one background thread owns the event loop
(and with it every NATS object), a thread pool does the per-batch work, another thread serves HTTP."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from prometheus_client import CollectorRegistry

from cdc_service import __version__, health
from cdc_service.adapters.jetstream_retry import ProvisioningRetry
from cdc_service.adapters.nats_fast_batch import choose_publisher
from cdc_service.adapters.nats_jetstream import (
    ConnectionState,
    ProvisioningError,
    PullIntake,
    PushIntake,
    connect,
    provision,
)
from cdc_service.adapters.nats_partitions import PartitionedIntake, ensure_partitioned_stream
from cdc_service.adapters.redis_dedup import RedisDedupStore
from cdc_service.advisories import MaxDeliveriesWatcher
from cdc_service.config import Settings, effective, mask_url
from cdc_service.consumer_watchdog import ConsumerWatchdog
from cdc_service.core.events import EventBuilder
from cdc_service.core.partitions import MIN_SERVER, member_id, supports_partitions
from cdc_service.engine import Engine
from cdc_service.health import FailureLog, HealthFacts
from cdc_service.http import HealthServer
from cdc_service.metrics import Metrics, register_runtime_collectors
from cdc_service.nats_health import ConnectionEvents, PingWatch, ReadLoopWatch
from cdc_service.summary import summarise, totals
from cdc_service.worker import BatchPreparer

log = logging.getLogger("cdc_service.service")

_REDIS_PROBE_PERIOD = 2.0


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


def _starting(settings: Settings, pool_size: int, http_port: int) -> dict[str, Any]:
    """The fields of the ``starting`` log line."""
    return {
        "version": __version__,
        "nats": [mask_url(u) for u in settings.nats.url],
        "redis": mask_url(settings.redis.url),
        "mode": settings.ingest.mode,
        "ordering": settings.ingest.ordering,
        "pool_size": pool_size,
        "batch_size": settings.ingest.batch_size,
        "http_port": http_port,
    }


def _check_server(nc: Client, settings: Settings) -> None:
    """Raise ``UnsupportedServer`` when a setting needs a newer nats-server than the one connected."""
    version = str(nc._server_info.get("version", ""))
    if settings.ingest.ordering == "partitioned" and not supports_partitions(version):
        raise UnsupportedServer(
            f"ingest.ordering: partitioned needs nats-server {'.'.join(map(str, MIN_SERVER))} or newer "
            f"(pull-consumer priority groups); the server is {version or 'of unknown version'}"
        )


async def _start_intake(
    nc: Client, js: JetStreamContext, settings: Settings, metrics: Metrics, engine: Engine, consumer: ConsumerConfig
) -> PushIntake | PullIntake | PartitionedIntake:
    """Bind to the input as ``ingest.ordering`` and ``ingest.mode`` say, handing what arrives to ``engine``."""
    if settings.ingest.ordering == "partitioned":
        partitions = PartitionedIntake(nc, js, settings, metrics, member_id(socket.gethostname(), os.getpid()))
        await partitions.start(engine.on_batch)
        return partitions
    if settings.ingest.mode == "pull":
        pull = PullIntake(js, settings.ingest)
        await pull.start(engine.on_batch)
        return pull
    push = PushIntake(js, settings.ingest, consumer)
    await push.start(engine)
    return push


# Allocations (of container objects) net of frees between two collections of the youngest generation; Python's
# default is 700. See tune_garbage_collection.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collection() -> None:
    """Once start-up is done: keep the collector off what start-up made, and collect the young generation less often.

    Every event makes a dozen short-lived container objects (futures, outcomes, dicts), so with Python's default
    threshold of 700 the young generation was collected every few dozen events, and the older generations (which
    hold the caches, the settings, every module) were walked again and again for almost nothing: the hot path makes
    few reference cycles. ``gc.freeze`` moves everything alive now to a generation the collector never walks; the
    higher threshold bounds what cyclic garbage can wait for a collection to tens of thousands of small objects.
    """
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, oldest)


class Service:
    """One replica. ``run()`` blocks in the main thread until SIGTERM/SIGINT or a fatal error; returns the exit code.

    The constructor only builds; ``run()`` binds the HTTP port and starts the threads, and releases all of it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings = effective(settings)
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
        self._liveness_log = FailureLog(log)
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
        self._provisioning = ProvisioningRetry(settings.nats.provision_timeout)  # JetStream electing leaders
        # The loop thread's watches, made as their subjects come to exist during start-up.
        self._read_loop: ReadLoopWatch | None = None
        self._pings: PingWatch | None = None
        self._watchdog: ConsumerWatchdog | None = None  # not in partitioned mode: each puller keeps its own durable
        self._intake: PushIntake | PullIntake | PartitionedIntake | None = None
        self._advisories: MaxDeliveriesWatcher | None = None
        self.engine: Engine | None = None
        self._background: list[asyncio.Task[None]] = []
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
        try:
            self.http.start()
        except OSError as exc:  # the HTTP port is taken or cannot be bound: name the setting that chooses it
            where = f"{self.settings.http.host}:{self.settings.http.port}"
            log.critical("cannot start: cannot listen on %s (http.port, http.host): %s", where, exc.strerror or exc)
            self._loop.close()
            self._release()
            return 1
        self._loop_thread.start()
        log.info("starting", extra=_starting(self.settings, self.pool_size, self.http.port))
        # Start-up runs on the loop while this thread keeps answering signals: until NATS answers (nats-py retries
        # the first connection forever here) the pod is alive but not ready, and SIGTERM still ends it at once.
        startup = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        while not startup.done() and not self._stop.wait(0.1):
            pass
        if not startup.done():
            startup.cancel()
        elif startup.exception() is not None:
            self._startup_failed(startup.exception())
        else:
            tune_garbage_collection()
            log.info(
                "consuming", extra={"stream": self.settings.ingest.stream, "consumer": self.settings.ingest.durable}
            )
        while not self._stop.wait(0.5):
            pass
        self._shutdown()
        return self._exit_code

    def _startup_failed(self, exc: BaseException | None) -> None:
        if isinstance(exc, UnsupportedServer):
            print(f"cdc_service: invalid setting {exc}", file=sys.stderr)
            self._exit_code = 2
        elif isinstance(exc, (ConnectionError, ProvisioningError)):
            log.critical("cannot start: %s", exc)
        else:
            log.critical("cannot start", exc_info=exc)
        self._exit_code = self._exit_code or 1
        self._stop.set()

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
            asyncio.run_coroutine_threadsafe(self._stop_async(work_deadline), self._loop).result(grace)
        except Exception:
            log.exception("shutdown did not complete cleanly")
            self._exit_code = self._exit_code or 1
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(timeout=5)
        self._release()
        log.info("stopped", extra={"exit_code": self._exit_code, **totals(self.engine, self.dedup)})

    def _release(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.http.stop()
        self.dedup.close()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        # Both run from the loop's first moment: liveness and Redis state must not wait for NATS.
        self._background += [
            self._loop.create_task(self._tick(), name="cdc-tick"),
            self._loop.create_task(self._probe_redis(), name="cdc-redis-probe"),
        ]
        self._loop.run_forever()

    # ---------------------------------------------------------------------------------------------- probes

    def facts(self) -> HealthFacts:
        """What the probes decide on, read now (from the HTTP thread: each read is of one attribute)."""
        now, nc, engine = time.monotonic(), self._nc, self.engine
        stopped_at = self._read_loop.stopped_at if self._read_loop is not None else None
        return HealthFacts(
            stopping=self._stopping,
            nats_state=self._nats_state.describe(),
            nats_created=nc is not None,
            nats_connected=nc is not None and nc.is_connected,
            read_loop_stopped_for=None if stopped_at is None else now - stopped_at,
            started=self._ready,
            starting=self._provisioning.problem,
            intake_active=self._intake is not None and self._intake.active,
            consumer_problem=self._watchdog.problem if self._watchdog is not None else None,
            nats_problem=self._pings.problem if self._pings is not None else None,
            redis_ok=self.dedup.available,
            redis_problem=self.dedup.problem,
            loop_quiet_for=now - self._loop_tick,
            engine_stalled=engine is not None and engine.stalled(now),
            inflight=engine.inflight if engine is not None else 0,
            unsettled_for=now - engine.last_settled if engine is not None else 0.0,
        )

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """``health.liveness`` of the facts; the first failure of an episode is logged critically."""
        return self._liveness_log.report(health.liveness(self.facts()))

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return health.readiness(self.facts())

    # ---------------------------------------------------------------------------------------------- loop thread

    async def _start(self) -> None:
        settings = self.settings
        events = ConnectionEvents(self.metrics, log, lambda: self._stopping, self._connection_lost)
        nc = self._nc = await connect(
            settings.nats,
            on_disconnected=events.disconnected,
            on_reconnected=events.reconnected,
            on_closed=events.closed,
            state=self._nats_state,
        )
        self._read_loop = ReadLoopWatch(nc, log)
        self.metrics.nats_connected.set(1)
        partitioned = settings.ingest.ordering == "partitioned"
        _check_server(nc, settings)
        js = nc.jetstream(timeout=10)
        consumer = await self._provisioning.run(js, lambda js: provision(js, settings))
        if partitioned:
            await self._provisioning.run(js, lambda js: ensure_partitioned_stream(js, settings))
        publisher = await choose_publisher(nc, js, settings)
        await publisher.start()
        builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
        prepare = BatchPreparer(builder, self.dedup, self.metrics, max_deliver=settings.ingest.max_deliver)
        engine = self.engine = Engine(settings, prepare, self.dedup, publisher, self._executor, self.metrics)
        await engine.start()
        if settings.dlq.enabled:
            self._advisories = MaxDeliveriesWatcher(
                js, settings, prepare, self.dedup, publisher, self._executor, self.metrics
            )
            await self._advisories.start()
        self._intake = await _start_intake(nc, js, settings, self.metrics, engine, consumer)
        self._pings = PingWatch(nc, engine, self.metrics, log, settings.health.nats_ping_timeout)
        if not partitioned:  # each partition's puller recreates its own durable
            self._watchdog = ConsumerWatchdog(js, settings.ingest, self.metrics, log)
        summary = summarise(engine, self.dedup, log, settings.log.summary_interval, self._watchdog)
        watches = {"cdc-summary": summary, "cdc-nats-probe": self._pings.run()}
        if self._watchdog is not None:
            watches["cdc-consumer-watchdog"] = self._watchdog.run()
        self._background += [asyncio.create_task(watch, name=name) for name, watch in watches.items()]
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
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)  # let them finish cancelling first
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
            if self._read_loop is not None:
                self._read_loop.check(stopping=self._stopping)
            await asyncio.sleep(1.0)

    async def _probe_redis(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            up = await loop.run_in_executor(self._executor, self.dedup.probe)
            self.metrics.redis_up.set(1 if up else 0)
            await asyncio.sleep(_REDIS_PROBE_PERIOD)

    def _connection_lost(self) -> None:
        self._exit_code = 1
        self._stop.set()
