"""What happens to each inbound message, decided without I/O.

Workers return one of these per message; only the loop thread turns them into NATS calls. ``decide_failure`` is the
single place that maps an error class to an outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Stable dead-letter reason codes (the ``Cdc-Error-Reason`` header). Operators alert and replay on these."""

    INVALID_JSON = "invalid_json"
    INVALID_SHAPE = "invalid_shape"
    MISSING_FIELD = "missing_field"
    INVALID_SUBJECT = "invalid_subject"
    INVALID_SUBJECT_TOKEN = "invalid_subject_token"
    TENANT_MISMATCH = "tenant_mismatch"
    TABLE_MISMATCH = "table_mismatch"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    MAX_DELIVERIES = "max_deliveries"


class PoisonError(Exception):
    """Input that can never succeed, however often it is retried: dead-letter it and terminate it."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """A dependency failed in a way that may heal (timeout, lost connection): retry later, never drop."""


@dataclass(slots=True)
class Skip:
    """The table has no route: acknowledge, publish nothing."""

    table: str


@dataclass(slots=True)
class Duplicate:
    """The Redis marker says this event was already published: acknowledge, publish nothing."""

    table: str
    event_id: str


@dataclass(slots=True)
class Publish:
    """Publish ``payload`` to ``subject`` with ``Nats-Msg-Id: event_id``, then mark and acknowledge."""

    table: str
    event_id: str
    subject: str
    payload: bytes
    commit_time: float | None  # unix seconds of the source commit, for the lag metric
    claimed: bool = False  # this replica holds the Redis claim on event_id
    request_id: str = ""  # X-Request-ID, derived from event_id: the same on every retry
    drift: tuple[tuple[str, ...], tuple[str, ...]] | None = None  # (unexpected, missing) columns, when checked
    traceparent: str = ""  # the source message's W3C traceparent, passed through when valid
    routing: tuple[str, str] | None = None  # (row key, subject fields as JSON) to remember for the row's delete


@dataclass(slots=True)
class ClaimedElsewhere:
    """Another replica holds the claim on this event (it is publishing it): wait, look again, never drop."""

    table: str
    event: Publish


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Copy the original bytes to the dead-letter stream with a reason, then terminate the message."""

    table: str
    reason: Reason
    detail: str
    event_id: str = ""  # when the event was built before it failed (too large, out of delivery attempts)
    routing_key: str = ""  # a delete that lacks its routing fields: the row key to look up in the routing cache


@dataclass(frozen=True, slots=True)
class Retry:
    """Something unexpected or transient happened: negatively acknowledge with a delay so it is redelivered."""

    table: str
    delay: float
    detail: str


Outcome = Skip | Duplicate | Publish | ClaimedElsewhere | DeadLetter | Retry


def retry_delay(num_delivered: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Back-off for ``nak``: grows with each delivery attempt so a broken dependency is not hammered."""
    return float(min(cap, base * (2 ** max(0, num_delivered - 1))))


def decide_failure(exc: BaseException, *, table: str, num_delivered: int, max_deliver: int) -> Outcome:
    """Map an exception raised while handling one message to its outcome.

    Poison input is dead-lettered at once. Anything else is retried with a delay, except on the final delivery
    attempt, where the consumer would silently skip the message after us: then it is dead-lettered
    (``max_deliveries``) so that nothing disappears without a trace.
    """
    if isinstance(exc, PoisonError):
        return DeadLetter(table, exc.reason, exc.detail)
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if max_deliver > 0 and num_delivered >= max_deliver:
        return DeadLetter(
            table, Reason.MAX_DELIVERIES, f"failed on delivery {num_delivered} of {max_deliver}: {detail}"
        )
    return Retry(table, retry_delay(num_delivered), detail)
