"""Waiting for a condition by polling it with a deadline: the one helper for tests, tools, benchmarks and chaos.

``wait_for(check, timeout, what=...)`` calls ``check`` every ``interval`` seconds until it returns something truthy and
returns that value; ``await wait_for_async(...)`` does the same in an event loop (``check`` may return an awaitable).
After ``timeout`` seconds both raise ``TimeoutError`` naming ``what``, with the last value and the last error seen.

Errors raised by ``check`` of a type in ``retry_on`` (default: any ``Exception``) count as "not yet"; others, and
those of a type in ``give_up_on``, propagate at once. ``check`` raises ``GiveUp`` to end the wait early when the
condition can no longer come true (a process it waits for has exited, say): ``GiveUp`` always propagates.

The ``sleep`` calls below are the poll interval of a deadline loop, never a wait for something to happen. This module
is not part of the installed package: it is imported from the checkout (see docs/developer_guide.md).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

ANY_ERROR: tuple[type[BaseException], ...] = (Exception,)


class GiveUp(RuntimeError):
    """Raised by a check: the condition cannot come true any more; the wait ends with this error."""


def _timeout_error(what: str, timeout: float, last: object, error: BaseException | None) -> TimeoutError:
    detail = f"last value {last!r}" + (f", last error {error!r}" if error is not None else "")
    return TimeoutError(f"{what} not reached within {timeout:g}s ({detail})")


def wait_for(
    check: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    *,
    retry_on: tuple[type[BaseException], ...] = ANY_ERROR,
    give_up_on: tuple[type[BaseException], ...] = (),
) -> T:
    """Poll ``check()`` until it returns something truthy and return that; ``TimeoutError`` naming ``what`` after
    ``timeout`` s. ``check`` is called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout
    stop: tuple[type[BaseException], ...] = (GiveUp, *give_up_on)
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
            last, error = value, None
        except stop:
            raise
        except retry_on as exc:
            error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(what, timeout, last, error)
        time.sleep(min(interval, remaining))  # the poll interval of a deadline loop


@overload
async def wait_for_async(
    check: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
    *,
    retry_on: tuple[type[BaseException], ...] = ...,
    give_up_on: tuple[type[BaseException], ...] = ...,
) -> T: ...


@overload
async def wait_for_async(
    check: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
    *,
    retry_on: tuple[type[BaseException], ...] = ...,
    give_up_on: tuple[type[BaseException], ...] = ...,
) -> T: ...


async def wait_for_async(
    check: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
    *,
    retry_on: tuple[type[BaseException], ...] = ANY_ERROR,
    give_up_on: tuple[type[BaseException], ...] = (),
) -> Any:
    """``wait_for`` in an event loop: ``check()`` may return a value or an awaitable of one (a blocking ``check``
    blocks the loop for its duration; wrap it in ``asyncio.to_thread`` when that matters)."""
    deadline = time.monotonic() + timeout
    stop: tuple[type[BaseException], ...] = (GiveUp, *give_up_on)
    last: object = None
    error: BaseException | None = None
    while True:
        try:
            value: Any = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last, error = value, None
        except stop:
            raise
        except retry_on as exc:
            error = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(what, timeout, last, error)
        await asyncio.sleep(min(interval, remaining))  # the poll interval of a deadline loop
