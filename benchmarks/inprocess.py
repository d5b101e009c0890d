"""In-process benchmark (the brief's F-7), no sockets, in-memory fakes for JetStream and Redis.

Two views of the same cases:

* worker: the worker-side pipeline exactly as a pool thread runs it on a batch of 256 (parse, filter, transform,
  one dedup lookup, encode, outcome); the analogue of the Go original's ``ProcessEvent`` benchmark.
* engine: the whole pipeline including the loop thread (micro-batching, ordered publishing through a fake
  JetStream, markers, acks, metrics) fed one message at a time and drained; the fakes' own cost is included.

Reports events/s of wall time and per core (events per CPU-second of this process).

    python -m benchmarks.inprocess [--events 20000] [--json out.json] [--expect-columns]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from prometheus_client import CollectorRegistry

from cdc_service.config import IngestSettings, PublishSettings, Settings, settings_from_mapping
from cdc_service.core.events import EventBuilder
from cdc_service.engine import Engine
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage, FakePublisher
from cdc_service.worker import BatchPreparer
from tests.sequin import body, encode

TABLES = ("messages", "chats", "agents")


def _doc(i: int, table: str, size: str) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if size == "small":
        doc = body(table, lsn=i + 1, message_id=f"m{i}", chat_id=f"c{i % 500}")
        keep = ("message_id", "chat_id", "agent_id", "company_id")
        doc["record"] = {k: v for k, v in doc["record"].items() if k in keep}
        return doc
    if size == "large":
        attachments = [{"url": f"https://files/{n}", "size": n} for n in range(20)]
        extra = {"body": {"text": "x" * 4000, "attachments": attachments}}
    return body(table, lsn=i + 1, message_id=f"m{i}", chat_id=f"c{i % 500}", **extra)


@dataclass
class Case:
    name: str
    make: Callable[[int], FakeMessage]
    dedup: Callable[[], FakeDedupStore] = FakeDedupStore
    publisher: Callable[[], FakePublisher] = FakePublisher
    expect: str = "published"


def _message(i: int, table: str = "", size: str = "medium", raw: bytes | None = None) -> FakeMessage:
    table = table or TABLES[i % 3]
    data = raw if raw is not None else encode(_doc(i, table, size))
    return FakeMessage(f"cdc.acme.{table}", data, seq=i + 1)


def _numeric(i: int) -> FakeMessage:
    """A row with numeric columns written with a fraction or an exponent: row_data keeps their exact text."""
    doc = _doc(i, "messages", "medium")
    data = encode(doc).replace(b'"id": 1,', b'"id": 1, "amount": 12345678901234567890.25, "rate": 1E2, "ratio": 0.5,')
    return FakeMessage("cdc.acme.messages", data, seq=i + 1)


def _duplicates() -> FakeDedupStore:
    store = FakeDedupStore()
    store.marked.update(f"{i + 1}:chatdb:acme:messages:m{i}" for i in range(1_000_000))
    return store


CASES = [
    Case("happy_path_medium", _message),
    Case("payload_small", lambda i: _message(i, size="small")),
    Case("payload_large", lambda i: _message(i, size="large")),
    Case("numeric_columns", _numeric),
    Case("duplicate", lambda i: _message(i, "messages"), dedup=_duplicates, expect="duplicate"),
    Case("dedup_store_error", _message, dedup=lambda: FakeDedupStore(down=True)),
    Case("publish_error", _message, publisher=lambda: FakePublisher(failing=True), expect="retried"),
    Case("transform_error", lambda i: _message(i, "messages", raw=b'{"record": [1, 2]}'), expect="dead_lettered"),
    Case("skipped_table", lambda i: _message(i, "users", raw=b"{}"), expect="skipped"),
]


def _run_worker(case: Case, events: int, settings: Settings) -> dict[str, Any] | None:
    if case.name == "publish_error":
        return None  # publishing happens on the loop thread, not in the worker
    messages = [case.make(i) for i in range(events)]
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    prepare = BatchPreparer(builder, case.dedup(), Metrics(CollectorRegistry()), max_deliver=5)
    size = settings.ingest.batch_size
    batches = [messages[i : i + size] for i in range(0, events, size)]
    wall, cpu = time.perf_counter(), time.process_time()
    outcomes = [outcome for batch in batches for outcome in prepare(batch)]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    expected = {"published": "Publish", "duplicate": "Duplicate", "dead_lettered": "DeadLetter", "skipped": "Skip"}
    kinds = {type(o).__name__ for o in outcomes}
    if len(outcomes) != events or kinds != {expected[case.expect]}:
        raise SystemExit(f"worker {case.name}: expected {events} x {expected[case.expect]}, got {kinds}")
    return _result(case.name, events, wall, cpu)


def _result(name: str, events: int, wall: float, cpu: float) -> dict[str, Any]:
    return {
        "case": name,
        "events": events,
        "seconds": round(wall, 4),
        "events_per_s": round(events / wall),
        "events_per_cpu_s": round(events / cpu),
        "us_per_event_cpu": round(cpu / events * 1e6, 2),
    }


async def _run(case: Case, events: int, settings: Settings) -> dict[str, Any]:
    messages = [case.make(i) for i in range(events)]
    metrics = Metrics(CollectorRegistry())
    dedup = case.dedup()
    publisher = case.publisher()
    builder = EventBuilder(settings.layout, settings.routes, settings.ingest.max_payload_bytes)
    with ThreadPoolExecutor(settings.workers.resolved_pool_size(2)) as pool:
        engine = Engine(
            settings, BatchPreparer(builder, dedup, metrics, max_deliver=5), dedup, publisher, pool, metrics
        )
        await engine.start()
        wall, cpu = time.perf_counter(), time.process_time()
        for msg in messages:
            await engine.on_message(msg)
        await engine.drain(time.monotonic() + 120)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    settled = sum(1 for m in messages if m.settled)
    if settled != events or engine.totals[case.expect] != events:
        raise SystemExit(f"{case.name}: expected {events} {case.expect}, got {dict(engine.totals)}")
    return _result(case.name, events, wall, cpu)


def main(argv: list[str] | None = None) -> int:
    logging.disable(logging.CRITICAL)  # the error cases log per message by design; keep the table readable
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--expect-columns",
        action="store_true",
        help="set routes.<table>.columns to the sample rows' columns (measures the schema drift check)",
    )
    args = parser.parse_args(argv)
    base = Settings()
    if args.expect_columns:
        routes = {t: {"columns": list(_doc(0, t, "medium")["record"])} for t in TABLES}
        base = settings_from_mapping({"routes": routes})
    # A failing output is held for max_hold before the nak; zero keeps the error case about our own cost.
    settings = replace(
        base,
        ingest=replace(base.ingest, max_deliver=5),
        publish=replace(base.publish, max_hold=0.0, retry_initial=0.001, retry_max=0.001),
    )
    assert isinstance(settings.ingest, IngestSettings) and isinstance(settings.publish, PublishSettings)
    _run_worker(CASES[0], 5_000, settings)  # warm-up: allocator, caches, imports; not reported
    results: dict[str, list[dict[str, Any]]] = {"worker": [], "engine": []}
    for view in ("worker", "engine"):
        print(f"\n{view}: {'case':<22} {'events/s':>10} {'per core':>10} {'us/event':>9}")
        for case in CASES:
            result = (
                _run_worker(case, args.events, settings)
                if view == "worker"
                else asyncio.run(_run(case, args.events, settings))
            )
            if result is None:
                continue
            results[view].append(result)
            print(
                f"{'':8}{case.name:<22} {result['events_per_s']:>10,} {result['events_per_cpu_s']:>10,} "
                f"{result['us_per_event_cpu']:>9}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"python": sys.version.split()[0], "results": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
