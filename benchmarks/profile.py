"""A py-spy profile of the service draining a backlog: where the loop thread and the workers spend the GIL.

    python -m benchmarks.profile --events 60000 [--set publish.fast_batch=true] [--out /tmp/profile]
    python -m benchmarks.profile --offered 5000 --seconds 20     # at a fixed offered rate instead of a backlog

Starts nats-server and redis-server on free loopback ports, preloads N events, then starts ``python -m cdc_service``
with ``py-spy record --gil --threads --format raw --pid`` attached from ready until the backlog is drained, and
prints the share of GIL samples
per thread and the functions with the most samples (own and cumulative). Needs py-spy (``pip install py-spy``, a dev
tool, not a dependency). Every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StorageType, StreamConfig

from benchmarks.common import (
    IN_STREAM,
    IN_SUBJECTS,
    OUT_STREAM,
    PUSH_DURABLE,
    consumer_info,
    make_events,
    preload,
    stream_count,
)
from tests.servers import NatsServer, Process, RedisServer, ServiceProcess
from tools.polling import wait_for_async


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


async def _drain(args: argparse.Namespace, workdir: Path) -> Path:
    nats_server, redis_server = NatsServer(workdir), RedisServer(workdir)
    owned: list[Any] = []
    try:
        for server in (nats_server, redis_server):
            server.start()
            owned.append(server)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream(timeout=10, publish_async_max_pending=4000)
        await js.add_stream(StreamConfig(name=IN_STREAM, subjects=IN_SUBJECTS, storage=StorageType.FILE))
        if not args.offered:
            await preload(js, make_events(args.events))
        overrides = {key: _value(value) for key, value in (item.split("=", 1) for item in args.set)}
        service = ServiceProcess(workdir, nats_server.url, redis_server.url, **overrides)
        raw = args.out / "profile.txt"
        service.start()
        owned.append(service)
        service.wait_ready(60)
        # Attached by pid, stopped with SIGINT (py-spy then writes its file); the service itself ends with SIGTERM.
        spy = Process(
            [
                shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy"),
                *("record", "--gil", "--threads", "--nonblocking", "--rate", str(args.rate), "--format", "raw"),
                *("--output", str(raw), "--pid", str(service.pid)),
            ],
            workdir / "py-spy.log",
        )
        spy.start()
        owned.append(spy)

        expected = args.events
        if args.offered:
            # The producer offers the rate from its own process; the profile covers its whole run and the tail.
            expected = int(args.offered * args.seconds)
            producer = Process(
                [
                    sys.executable,
                    *("-m", "benchmarks.producer", "--url", nats_server.url),
                    *("--rate", str(args.offered), "--seconds", str(args.seconds)),
                    *("--result", str(workdir / "producer.json")),
                ],
                workdir / "producer.log",
            )
            producer.start()
            owned.append(producer)

        async def drained() -> bool:
            info = await consumer_info(nc, IN_STREAM, PUSH_DURABLE)
            settled = bool(info) and info["num_pending"] == 0 and info["num_ack_pending"] == 0  # type: ignore[index]
            return settled and await stream_count(nc, OUT_STREAM) >= expected

        await wait_for_async(drained, 60 + expected / 1000 + args.seconds, 0.2, what="all events published")
        await nc.close()
        spy.signal(signal.SIGINT)
        spy.wait(30)
        if not raw.exists():
            raise RuntimeError(f"py-spy wrote nothing: {spy.output()[-2000:]}")
        return raw
    finally:
        for proc in reversed(owned):
            proc.stop(timeout=30)


def _function(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def _area(frame: str) -> str:
    """What a leaf frame belongs to: ``nats``, ``asyncio``, ``cdc_service/engine.py`` (ours by file), and so on."""
    match = re.search(r"\(([^:)]*)", frame)
    path = match.group(1) if match else frame
    if path.startswith("cdc_service/"):
        return path
    return path.split("/")[0] if "/" in path else path


def summarise(raw: Path, top: int) -> str:
    """Per-thread shares, the loop thread's leaf samples by area, and the top functions (own and cumulative),
    from py-spy's raw (collapsed) output; line numbers are merged into their functions."""
    threads: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total_in: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        thread = re.sub(r"_\d+$", "", frames[0].rpartition(": ")[2])
        threads[thread] += count
        leaf = _function(frames[-1])
        own[leaf] += count
        if thread == "cdc-loop":
            areas[_area(frames[-1])] += count
        for frame in {_function(f) for f in frames[1:]}:
            total_in[frame] += count
    lines = [f"{samples} GIL samples", "", "threads:"]
    lines += [f"  {n / samples:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", "loop thread, leaf samples by area (share of all samples):"]
    lines += [f"  {n / samples:6.1%}  {name}" for name, n in areas.most_common(top)]
    lines += ["", "own (leaf) time:"]
    lines += [f"  {n / samples:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "cumulative:"]
    lines += [f"  {n / samples:6.1%}  {name}" for name, n in total_in.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--set", action="append", default=[], help="a setting for the service, e.g. ingest.mode=pull")
    parser.add_argument("--offered", type=int, default=0, help="events/s offered by a producer instead of a backlog")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the producer offers --offered")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--raw", type=Path, help="only summarise this py-spy raw file")
    parser.add_argument("--out", type=Path, default=None, help="folder for profile.txt (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.raw:
        print(summarise(args.raw, args.top))
        return 0
    args.out = args.out or Path(tempfile.mkdtemp(prefix="cdc-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cdc-profile-run-"))
    try:
        raw = asyncio.run(_drain(args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = summarise(raw, args.top)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nraw profile: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
