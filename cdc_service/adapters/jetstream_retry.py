"""Start-up provisioning against a JetStream that is still electing leaders.

On a fresh cluster (or one that just lost a node) the meta layer and each just-created replicated stream elect a
leader; until they have one, a JetStream API request times out, finds no responder or is answered "temporarily
unavailable". ``ProvisioningRetry`` retries those with capped exponential backoff for at most
``nats.provision_timeout``; every other error (a refused configuration, a ``ProvisioningError`` that says what to
fix) ends start-up at once, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, ServiceUnavailableError

from cdc_service.adapters.nats_jetstream import ProvisioningError

log = logging.getLogger("cdc_service.nats")

T = TypeVar("T")

FIRST_WAIT = 0.25  # seconds before the second attempt; doubled after each failure ...
MAX_WAIT = 5.0  # ... up to this

# nats-server's error codes (server/errors.json) that mean "no leader yet" or "try again", whatever their status.
TRANSIENT_CODES = frozenset(
    {
        10004,  # JSClusterIncompleteErr (503): incomplete results
        10007,  # JSClusterNotAssignedErr (500): JetStream cluster not assigned to this server
        10008,  # JSClusterNotAvailErr (503): JetStream system temporarily unavailable
        10009,  # JSClusterNotLeaderErr (500): JetStream cluster can not handle request
        10118,  # JSStreamOfflineErr (500): stream is offline
        10119,  # JSConsumerOfflineErr (500): consumer is offline
    }
)
# 503 answers that no wait will change: JetStream or clustering is not enabled where the settings need it.
PERMANENT_503_CODES = frozenset(
    {
        10010,  # JSClusterRequiredErr: JetStream clustering support required
        10036,  # JSClusterUnSupportFeatureErr: not currently supported in clustered mode
        10039,  # JSNotEnabledForAccountErr: JetStream not enabled for account
        10076,  # JSNotEnabledErr: JetStream not enabled
    }
)


def transient(exc: BaseException) -> bool:
    """Whether a JetStream API failure may go away on its own within seconds (a leader election)."""
    if isinstance(exc, (NatsTimeoutError, NoRespondersError)):
        return True
    if isinstance(exc, ServiceUnavailableError):  # 503; without a code: nats-py's "no responders" status
        return exc.err_code not in PERMANENT_503_CODES
    return isinstance(exc, APIError) and exc.err_code in TRANSIENT_CODES


def describe(exc: BaseException) -> str:
    """``Type: text``, short, for a log line and ``/readyz``."""
    if isinstance(exc, APIError):
        codes = {"code": exc.code, "err_code": exc.err_code}
        text = " ".join([*(f"{k}={v}" for k, v in codes.items() if v), exc.description or ""]).strip()
    else:
        text = str(exc).strip()
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class _Named:
    """A JetStream context that remembers the last API call made through it (``call``), to name it in the log."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.call = ""

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._js, name)
        if not callable(attribute):
            return attribute

        def named(*args: Any, **kwargs: Any) -> Any:
            words = [
                a if isinstance(a, str) else getattr(a, "durable_name", None) or getattr(a, "name", None) for a in args
            ]
            self.call = f"js.{name}({', '.join(w for w in words if isinstance(w, str))})"
            return attribute(*args, **kwargs)

        return named


class ProvisioningRetry:
    """Runs start-up steps that call the JetStream API, retrying their transient failures (``transient``) for at
    most ``budget`` seconds in all, each step from its start (every step is create-or-update, so repeating one is
    safe). ``problem`` describes the latest failed attempt while it waits (for ``/readyz``), else None."""

    def __init__(
        self,
        budget: float,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget = budget
        self.problem: str | None = None
        self._sleep = sleep
        self._clock = clock
        self._deadline: float | None = None
        self._attempt = 0

    async def run(self, js: JetStreamContext, step: Callable[[JetStreamContext], Awaitable[T]]) -> T:
        """``await step(js)``, again after each transient failure until it succeeds or the budget (counted from the
        first call of ``run``) is spent; then a ``ProvisioningError`` names the last failure."""
        if self._deadline is None:
            self._deadline = self._clock() + self.budget
        named = _Named(js)
        wait = FIRST_WAIT
        while True:
            try:
                result = await step(cast(JetStreamContext, named))
            except Exception as exc:
                if not transient(exc):
                    raise
                wait = await self._failed(named.call or "a JetStream request", exc, wait)
            else:
                self.problem = None
                return result

    async def _failed(self, call: str, exc: BaseException, wait: float) -> float:
        """Log the failure and wait before the next attempt; the next wait, or raise when the budget is spent."""
        assert self._deadline is not None
        self._attempt += 1
        error = describe(exc)
        left = self._deadline - self._clock()
        if left <= 0:
            raise ProvisioningError(
                f"JetStream did not complete provisioning within nats.provision_timeout ({self.budget:g}s); "
                f"{self._attempt} attempts, the last: {call}: {error}. Check that JetStream is enabled and has a "
                "leader (`nats server report jetstream`), or raise nats.provision_timeout"
            ) from exc
        pause = min(wait, left)
        self.problem = f"starting: provisioning streams (attempt {self._attempt}: {call}: {error})"
        log.warning(
            "provisioning: %s failed (attempt %d, %s); next attempt in %.2gs",
            call,
            self._attempt,
            error,
            pause,
            extra={"call": call, "attempt": self._attempt, "error": error, "next_attempt_in": round(pause, 3)},
        )
        await self._sleep(pause)
        return min(wait * 2, MAX_WAIT)
