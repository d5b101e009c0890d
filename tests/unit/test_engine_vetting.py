"""The walk's vetting of outgoing events: subjects found publishable are remembered, in a bounded set, and a
remembered subject is never taken for a bad one or the other way round."""

from __future__ import annotations

import pytest

from cdc_service import engine
from cdc_service.core.outcomes import DeadLetter, Publish, Reason


def _event(subject: str, event_id: str = "e1") -> Publish:
    return Publish("messages", event_id, subject, b"{}", None)


def test_a_publishable_subject_is_remembered_and_a_bad_one_is_not() -> None:
    known: set[str] = set()
    good = _event("wa.acme.messages")
    assert engine._vetted(good, 1_000, [], known) is good
    assert known == {"wa.acme.messages"}
    assert engine._vetted(good, 1_000, [], known) is good
    bad = engine._vetted(_event("wa.ac me.messages"), 1_000, [], known)
    assert isinstance(bad, DeadLetter) and bad.reason is Reason.INVALID_SUBJECT_TOKEN
    assert known == {"wa.acme.messages"}


def test_a_remembered_subject_still_gets_the_size_check() -> None:
    known = {"wa.acme.messages"}
    to_release: list[str] = []
    big = Publish("messages", "e2", "wa.acme.messages", b"x" * 2_000, None, claimed=True)
    dead = engine._vetted(big, 1_000, to_release, known)
    assert isinstance(dead, DeadLetter) and dead.reason is Reason.PAYLOAD_TOO_LARGE
    assert to_release == ["e2"]


def test_the_remembered_subjects_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "PUBLISHABLE_SUBJECTS_KEPT", 3)
    known: set[str] = set()
    for n in range(10):
        engine._vetted(_event(f"wa.c{n}.messages"), 1_000, [], known)
        assert 1 <= len(known) <= 3
    assert "wa.c9.messages" in known
