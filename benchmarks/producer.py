"""Fixed-rate producer: core ``nc.publish`` of Sequin bodies at ``rate`` events/s in 1 ms ticks for ``seconds``.

    python -m benchmarks.producer --url nats://... --rate 5000 --seconds 30 --result out.json

The input stream captures the subjects, so no PubAck is awaited. Each tick sends what the schedule owes by then
(``floor(elapsed * rate)`` minus what was sent), so a late tick catches up instead of lowering the rate. Bodies carry
``commit_lsn`` 1..N and are built before the clock starts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import nats

from benchmarks.common import make_events, write_json


async def run(url: str, rate: float, seconds: float, tick: float) -> dict[str, Any]:
    total = int(rate * seconds)
    events = make_events(total)
    nc = await nats.connect(url, name="bench-producer")
    sent = 0
    max_burst = 0
    late_ticks = 0
    started_wall = time.time()
    start = time.perf_counter()
    next_tick = start
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        burst = due - sent
        if burst > max(1, int(rate * tick)) * 2:
            late_ticks += 1
        max_burst = max(max_burst, burst)
        for subject, data in events[sent:due]:
            await nc.publish(subject, data)
        sent = due
        next_tick += tick
        delay = next_tick - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            next_tick = time.perf_counter()
            await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    ended_wall = time.time()
    await nc.flush(timeout=10)
    await nc.close()
    return {
        "sent": sent,
        "rate_target": rate,
        "seconds_target": seconds,
        "started": started_wall,
        "ended": ended_wall,
        "seconds": elapsed,
        "rate": sent / elapsed if elapsed else 0.0,
        "max_burst": max_burst,
        "late_ticks": late_ticks,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--tick-ms", type=float, default=1.0)
    parser.add_argument("--result", required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.url, args.rate, args.seconds, args.tick_ms / 1000.0))
    write_json(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
