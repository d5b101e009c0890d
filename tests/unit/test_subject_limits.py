"""Outbound subjects stay within what nats-server accepts: dead-letter subjects for hostile source subjects."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc_service.core.subjects import (
    MAX_OUTBOUND_SUBJECT_BYTES,
    dead_letter_subject,
    printable_subject,
    publishable_subject_problem,
    subject_bytes,
)

HASHED = "dlq._subject."


@pytest.mark.parametrize(
    ("source", "kept"),
    [
        ("cdc.acme.messages", True),
        ("cdc.ácme.messages", True),
        ("cdc." + "C" * 4040 + ".messages", False),  # the control line would exceed max_control_line
        ("cdc.\udcff\udcfe.messages", False),  # not UTF-8 on the wire
        ("cdc.>.messages", False),
        ("cdc.*.messages", False),
        ("cdc.acme.>", False),
        ("cdc..messages", False),
        ("cdc.a\x01b.messages", False),
    ],
)
def test_dead_letter_subject_keeps_safe_subjects_and_hashes_the_rest(source: str, kept: bool) -> None:
    subject = dead_letter_subject("dlq", source)
    assert publishable_subject_problem(subject) is None
    assert subject == (f"dlq.{source}" if kept else subject)
    if not kept:
        assert subject.startswith(HASHED) and len(subject) == len(HASHED) + 32
        assert dead_letter_subject("dlq", source) == subject  # deterministic: every delivery goes to one place


@given(st.text(max_size=5000))
def test_dead_letter_subjects_are_always_publishable(source: str) -> None:
    subject = dead_letter_subject("dlq", source)
    assert publishable_subject_problem(subject) is None
    assert len(subject.encode()) <= MAX_OUTBOUND_SUBJECT_BYTES


def test_subject_bytes_restores_the_wire_bytes() -> None:
    wire = b"cdc.\xff\xfe.messages"
    assert subject_bytes(wire.decode("utf-8", "surrogateescape")) == wire


def test_printable_subject_escapes_only_what_headers_cannot_carry() -> None:
    assert printable_subject("cdc.acme.messages") == ("cdc.acme.messages", False)
    assert printable_subject("cdc.\udcff.messages") == ("cdc.\\xff.messages", True)
    assert printable_subject("cdc.a\x01.messages") == ("cdc.a\\x01.messages", True)
