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
    OUTPUT_REJECTED = "output_rejected"


class PoisonError(Exception):
    """Input that can never succeed, however often it is retried: dead-letter it and terminate it."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """A dependency failed in a way that may heal (timeout, lost connection): retry later, never drop."""


class PublishRejected(Exception):
    """JetStream answered a publish with an error; ``code`` is its ``err_code`` when the reply carried one."""

    def __init__(self, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.code = code


# JetStream errors that will not clear for this message however long it is retried: the output's limits refuse this
# message itself (its size, its headers, or its subject's quota under discard_new_per_subject). 10077 is the generic
# "store failed" whose text names the limit: "maximum messages exceeded" or "maximum bytes exceeded" (a full stream
# with discard=new) clear as consumers or max_age remove messages, so they stay transient.
_PERMANENT_CODES = frozenset({10054, 10097})  # message size exceeds maximum; header size exceeds maximum
_PERMANENT_STORE_FAILURES = ("per subject", "too large", "exceeds maximum")


def is_permanent_rejection(exc: BaseException) -> bool:
    """True for a publish rejection that retrying cannot fix (see ``_PERMANENT_CODES``)."""
    if not isinstance(exc, PublishRejected) or exc.code is None:
        return False
    if exc.code in _PERMANENT_CODES:
        return True
    text = str(exc).lower()
    return exc.code == 10077 and any(marker in text for marker in _PERMANENT_STORE_FAILURES)


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


class Action(StrEnum):
    """What the loop thread does with an inbound message once its result is known."""

    ACK = "ack"  # done: the server forgets it
    NAK = "nak"  # hand it back, after a delay when one is given: the server redelivers it
    TERM = "term"  # done without success (dead-lettered): never redelivered


class Result(StrEnum):
    """How one inbound message ended: the ``result`` label of ``cdc_consumer_events_total`` and the engine's totals.

    Each member carries how the message is settled (``action``) and whether the processing-time histogram measures
    it (``timed``: the message went through), so a result and its action cannot disagree. Plain attributes, not
    properties or lookups: the ledger reads them once per message.
    """

    action: Action
    timed: bool
    progress: bool  # finished for good (acked or terminated): what liveness and the no-acks alert watch

    PUBLISHED = "published", Action.ACK, True
    DUPLICATE = "duplicate", Action.ACK, True
    SKIPPED = "skipped", Action.ACK, True
    DEAD_LETTERED = "dead_lettered", Action.TERM, False
    RETRIED = "retried", Action.NAK, False

    def __new__(cls, label: str, action: Action, timed: bool) -> Result:
        member = str.__new__(cls, label)
        member._value_ = label
        member.action = action
        member.timed = timed
        member.progress = action is not Action.NAK
        return member


def dead_letter_id(stream: str, seq: int) -> str:
    """The ``Nats-Msg-Id`` of stream message ``seq``'s dead letter, and the key of its Redis marker: one per message,
    however many replicas or paths dead-letter it."""
    return f"dlq:{stream}:{seq}"


def retry_delay(num_delivered: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Back-off for ``nak``: grows with each delivery attempt so a broken dependency is not hammered."""
    return float(min(cap, base * (2 ** max(0, num_delivered - 1))))


def decide_failure(exc: BaseException, *, table: str, num_delivered: int, max_deliver: int) -> DeadLetter | Retry:
    """Map an exception raised while handling one message to its outcome.

    Poison input is dead-lettered at once, and so is a publish the output refuses for good
    (``is_permanent_rejection``: reason ``output_rejected``). Anything else is retried with a delay, except on the
    final delivery attempt, where the consumer would silently skip the message after us: then it is dead-lettered
    (``max_deliveries``) so that nothing disappears without a trace.
    """
    if isinstance(exc, PoisonError):
        return DeadLetter(table, exc.reason, exc.detail)
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if is_permanent_rejection(exc):
        return DeadLetter(table, Reason.OUTPUT_REJECTED, f"the output stream refuses this event: {exc}"[:300])
    if max_deliver > 0 and num_delivered >= max_deliver:
        return DeadLetter(
            table, Reason.MAX_DELIVERIES, f"failed on delivery {num_delivered} of {max_deliver}: {detail}"
        )
    return Retry(table, retry_delay(num_delivered), detail)
