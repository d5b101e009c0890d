"""The periodic ``summary`` log line (and the totals of the ``stopped`` line): what the engine handled, in total and
in the last interval, and the dedup store's state."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any, Protocol


class Handled(Protocol):
    """What the summary reads of the engine."""

    @property
    def totals(self) -> Mapping[str, int]: ...

    @property
    def inflight(self) -> int: ...

    @property
    def lag(self) -> float | None: ...


class Backlog(Protocol):
    """The consumer watchdog: the durable's pending count at its last check (None before the first)."""

    @property
    def backlog(self) -> int | None: ...


class DedupState(Protocol):
    """What the summary reads of the dedup store."""

    @property
    def available(self) -> bool: ...

    @property
    def problem(self) -> str | None: ...


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


def totals(engine: Handled | None, dedup: DedupState) -> dict[str, Any]:
    """Counts by result since start, what is in flight and the Redis state; empty before the engine exists."""
    if engine is None:
        return {}
    return {
        **dict(engine.totals),
        "inflight": engine.inflight,
        "redis": "ok" if dedup.available else "degraded",
        **({"redis_detail": dedup.problem} if dedup.problem else {}),
    }


async def summarise(
    engine: Handled, dedup: DedupState, log: logging.Logger, interval: float, watchdog: Backlog | None
) -> None:
    """Log ``summary`` every ``interval`` seconds until cancelled; the backlog comes from ``watchdog`` (None in
    partitioned mode, where there is no single durable)."""
    previous: Counter[str] = Counter()
    since = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now = time.monotonic()
        current = Counter(engine.totals)
        extra = totals(engine, dedup)
        extra.update(
            interval_figures(current, previous, now - since, engine.lag, None if watchdog is None else watchdog.backlog)
        )
        previous, since = current, now
        log.info("summary", extra=extra)
