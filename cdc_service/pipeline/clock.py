"""The engine's source of time, injectable so tests can move it instead of waiting on the wall clock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """``monotonic()`` for durations and deadlines; ``time()`` (unix seconds) for timestamps operators read."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clocks."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


SYSTEM_CLOCK: Clock = SystemClock()
