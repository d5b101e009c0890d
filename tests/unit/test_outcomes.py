"""decide_failure and retry_delay: the one mapping from an error to an outcome."""

from __future__ import annotations

import pytest

from cdc_service.core.outcomes import (
    Action,
    DeadLetter,
    PoisonError,
    PublishRejected,
    Reason,
    Result,
    Retry,
    TransientError,
    decide_failure,
    retry_delay,
)


@pytest.mark.parametrize("reason", list(Reason))
@pytest.mark.parametrize(("delivered", "max_deliver"), [(1, 3), (3, 3), (7, -1)])
def test_poison_is_dead_lettered_with_its_reason(reason: Reason, delivered: int, max_deliver: int) -> None:
    outcome = decide_failure(
        PoisonError(reason, "bad input"), table="messages", num_delivered=delivered, max_deliver=max_deliver
    )
    assert outcome == DeadLetter("messages", reason, "bad input")


@pytest.mark.parametrize(
    ("exc", "delivered", "max_deliver", "delay"),
    [
        (TransientError("redis timeout"), 1, 3, 1.0),
        (TransientError("redis timeout"), 2, 3, 2.0),
        (RuntimeError("bug"), 1, 5, 1.0),
        (RuntimeError("bug"), 4, 5, 8.0),
        (KeyError("x"), 2, 10, 2.0),
        (ValueError("v"), 1, -1, 1.0),
        (ValueError("v"), 3, -1, 4.0),
        (ValueError("v"), 100, -1, 30.0),  # unlimited deliveries: never dead-lettered, delay capped
        (ValueError("v"), 1, 0, 1.0),  # 0 is not a limit either
    ],
)
def test_other_errors_are_retried(exc: Exception, delivered: int, max_deliver: int, delay: float) -> None:
    outcome = decide_failure(exc, table="chats", num_delivered=delivered, max_deliver=max_deliver)
    assert isinstance(outcome, Retry)
    assert outcome.table == "chats"
    assert outcome.delay == delay
    assert outcome.detail == f"{type(exc).__name__}: {exc}"


def test_retry_delay_grows_with_attempts() -> None:
    delays = [
        decide_failure(RuntimeError("x"), table="t", num_delivered=n, max_deliver=100).delay  # type: ignore[union-attr]
        for n in range(1, 8)
    ]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize(("delivered", "max_deliver"), [(3, 3), (4, 3), (1, 1), (10, 10)])
def test_final_attempt_is_dead_lettered(delivered: int, max_deliver: int) -> None:
    outcome = decide_failure(
        TransientError("publish timed out"), table="agents", num_delivered=delivered, max_deliver=max_deliver
    )
    assert isinstance(outcome, DeadLetter)
    assert outcome.table == "agents"
    assert outcome.reason is Reason.MAX_DELIVERIES
    assert outcome.detail == f"failed on delivery {delivered} of {max_deliver}: TransientError: publish timed out"


def test_detail_is_bounded() -> None:
    outcome = decide_failure(RuntimeError("x" * 1000), table="t", num_delivered=1, max_deliver=3)
    assert isinstance(outcome, Retry)
    assert len(outcome.detail) == 300


@pytest.mark.parametrize(
    ("delivered", "base", "cap", "delay"),
    [
        (0, 1.0, 30.0, 1.0),
        (-5, 1.0, 30.0, 1.0),
        (1, 1.0, 30.0, 1.0),
        (2, 1.0, 30.0, 2.0),
        (3, 1.0, 30.0, 4.0),
        (5, 1.0, 30.0, 16.0),
        (6, 1.0, 30.0, 30.0),
        (1000, 1.0, 30.0, 30.0),
        (1, 0.5, 30.0, 0.5),
        (3, 0.5, 30.0, 2.0),
        (4, 2.0, 10.0, 10.0),
        (3, 0.25, 1.0, 1.0),
    ],
)
def test_retry_delay(delivered: int, base: float, cap: float, delay: float) -> None:
    result = retry_delay(delivered, base, cap)
    assert result == delay
    assert isinstance(result, float)


def test_retry_delay_defaults() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4, 5, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]


def test_reason_codes_are_stable() -> None:
    assert {r.value for r in Reason} == {
        "invalid_json",
        "invalid_shape",
        "missing_field",
        "invalid_subject",
        "invalid_subject_token",
        "tenant_mismatch",
        "table_mismatch",
        "payload_too_large",
        "max_deliveries",
        "output_rejected",
    }
    assert Reason.INVALID_JSON == "invalid_json"


@pytest.mark.parametrize(
    ("exc", "permanent"),
    [
        (PublishRejected("maximum messages per subject exceeded (code 10077)", 10077), True),
        (PublishRejected("message size exceeds maximum allowed (code 10054)", 10054), True),
        (PublishRejected("header size exceeds maximum allowed of 64k (code 10097)", 10097), True),
        (PublishRejected("maximum messages exceeded (code 10077)", 10077), False),  # full stream, discard=new
        (PublishRejected("maximum bytes exceeded (code 10077)", 10077), False),
        (PublishRejected("insufficient storage resources available (code 10047)", 10047), False),
        (PublishRejected("invalid operation on sealed stream (code 10109)", 10109), False),
        (PublishRejected("expected stream does not match (code 10060)", 10060), False),
        (PublishRejected("no stream answered the publish (503)"), False),
        (PublishRejected("maximum messages per subject exceeded"), False),  # no code: not from JetStream
        (TransientError("no PubAck within publish.timeout"), False),
    ],
)
@pytest.mark.parametrize("delivered", [1, 3])
def test_publish_rejections_are_classified(exc: Exception, permanent: bool, delivered: int) -> None:
    outcome = decide_failure(exc, table="messages", num_delivered=delivered, max_deliver=3)
    if permanent:
        assert isinstance(outcome, DeadLetter) and outcome.reason == Reason.OUTPUT_REJECTED
        assert str(exc) in outcome.detail
    elif delivered == 3:
        assert isinstance(outcome, DeadLetter) and outcome.reason == Reason.MAX_DELIVERIES
    else:
        assert isinstance(outcome, Retry)


@pytest.mark.parametrize(
    ("result", "action", "progress", "timed"),
    [
        (Result.PUBLISHED, Action.ACK, True, True),
        (Result.DUPLICATE, Action.ACK, True, True),
        (Result.SKIPPED, Action.ACK, True, True),
        (Result.DEAD_LETTERED, Action.TERM, True, False),
        (Result.RETRIED, Action.NAK, False, False),
    ],
)
def test_each_result_knows_how_it_is_settled(result: Result, action: Action, progress: bool, timed: bool) -> None:
    assert (result.action, result.progress, result.timed) == (action, progress, timed)


def test_results_are_the_metric_labels() -> None:
    assert [r.value for r in Result] == ["published", "duplicate", "skipped", "dead_lettered", "retried"]
