"""The dead-letter wire format, in one place: what the engine and the max-deliveries watcher write, and what the
``dlq`` tools read back. Pure: no I/O.

A dead letter is the original message's bytes, published to ``<dlq.subject_prefix>.<source subject>`` (or a hashed
stand-in, see ``core.subjects.dead_letter_subject``) with these headers:

=============================== =========================================================================
``Nats-Msg-Id``                 ``dlq:<source stream>:<source seq>``: one dead letter per source message
``Nats-Expected-Stream``        the dead-letter stream (``dlq.stream``)
``Cdc-Error-Reason``            a ``core.outcomes.Reason`` value
``Cdc-Error-Detail``            printable, at most ``DETAIL_LIMIT`` characters
``Cdc-Source-Subject``          the source subject, escaped when it is not printable UTF-8
``Cdc-Source-Subject-Escaped``  ``true`` only when it was escaped
``Cdc-Source-Stream``           the source stream
``Cdc-Source-Seq``              the source stream sequence (where the whole original stays)
``Cdc-Delivered``               the delivery attempt that dead-lettered it
``Cdc-Body-Truncated``          the original body size, only when the body was cut to fit ``max_payload``
=============================== =========================================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cdc_service.core.outcomes import dead_letter_id
from cdc_service.core.subjects import dead_letter_subject, printable_subject

H_MSG_ID = "Nats-Msg-Id"
H_EXPECTED_STREAM = "Nats-Expected-Stream"
H_REASON = "Cdc-Error-Reason"
H_DETAIL = "Cdc-Error-Detail"
H_SOURCE_SUBJECT = "Cdc-Source-Subject"
H_SOURCE_SUBJECT_ESCAPED = "Cdc-Source-Subject-Escaped"  # "true": the source subject was not printable UTF-8
H_SOURCE_STREAM = "Cdc-Source-Stream"
H_SOURCE_SEQ = "Cdc-Source-Seq"
H_DELIVERED = "Cdc-Delivered"
H_TRUNCATED = "Cdc-Body-Truncated"  # the original size, when the original did not fit beside the headers

DETAIL_LIMIT = 300  # characters of Cdc-Error-Detail: enough for an error message, short enough for a header

# Wire size of a NATS header block: "NATS/1.0\r\n" and the closing "\r\n"; per header ": " and "\r\n".
HEADER_BLOCK_BYTES = 12
HEADER_LINE_BYTES = 4
# Kept free under max_payload beside the headers counted, so a body that fits never meets the server's limit exactly.
PAYLOAD_MARGIN = 64
# Kept free again once the body is cut: room for the Cdc-Body-Truncated header that the cut adds.
TRUNCATION_MARGIN = 64


def header_bytes(headers: Mapping[str, str]) -> int:
    """Wire size of a NATS header block (``NATS/1.0``, ``name: value`` lines, the blank line)."""
    return HEADER_BLOCK_BYTES + sum(len(k) + len(v.encode()) + HEADER_LINE_BYTES for k, v in headers.items())


def header_text(text: str, limit: int = DETAIL_LIMIT) -> str:
    """Header values cannot carry line breaks or control characters: each becomes a space; at most ``limit``."""
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


@dataclass(frozen=True, slots=True)
class DeadLetterMessage:
    """A dead letter ready to publish."""

    subject: str
    data: bytes
    headers: dict[str, str]


def build_dead_letter(
    *,
    subject_prefix: str,
    dlq_stream: str,
    max_payload: int,
    source_subject: str,
    data: bytes,
    stream: str,
    seq: int,
    delivered: int,
    reason: str,
    detail: str,
) -> DeadLetterMessage:
    """The dead letter of message ``seq`` of ``stream``.

    ``Nats-Msg-Id: dlq:<stream>:<seq>`` makes every way of dead-lettering one message (the engine on its final
    delivery, any replica handling its max-deliveries advisory) land in the dead-letter stream once.
    """
    # A subject that is not UTF-8 arrives with its bad bytes as lone surrogates: the header gets it escaped.
    printable, escaped = printable_subject(source_subject)
    headers = {
        H_MSG_ID: dead_letter_id(stream, seq),
        H_EXPECTED_STREAM: dlq_stream,
        H_REASON: reason,
        H_DETAIL: header_text(detail),
        H_SOURCE_SUBJECT: printable,
        H_SOURCE_STREAM: stream,
        H_SOURCE_SEQ: str(seq),
        H_DELIVERED: str(delivered),
    }
    if escaped:
        headers[H_SOURCE_SUBJECT_ESCAPED] = "true"
    room = max_payload - header_bytes(headers) - PAYLOAD_MARGIN
    if len(data) > room:
        # The server closes the connection on a message larger than max_payload, headers included. Keep what
        # fits; the whole original stays in the source stream at Cdc-Source-Seq.
        headers[H_TRUNCATED] = str(len(data))
        data = data[: max(0, room - TRUNCATION_MARGIN)]
    # The source subject itself when it can be published, else a hashed stand-in: a subject near the server's
    # control-line limit, not UTF-8 or with a wildcard token must not close the connection or be refused.
    return DeadLetterMessage(dead_letter_subject(subject_prefix, source_subject), data, headers)


@dataclass(frozen=True, slots=True)
class DeadLetterHeaders:
    """What the headers of a stored dead letter say, read leniently: a missing or malformed value is empty/None."""

    reason: str  # "unknown" when absent
    detail: str
    source_subject: str  # "" when neither the header nor the subject names it
    source_stream: str
    source_seq: int | None
    delivered: int | None
    truncated_from: int | None  # original size when the body was cut to fit
    subject_escaped: bool  # source_subject is an escaped rendering, not the subject's own bytes


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def source_subject_of(subject: str, headers: Mapping[str, str], prefix: str) -> str:
    """The subject the message was dead-lettered from: ``Cdc-Source-Subject``, else the subject minus the prefix."""
    named = headers.get(H_SOURCE_SUBJECT, "").strip()
    if named:
        return named
    lead = prefix + "."
    return subject[len(lead) :] if subject.startswith(lead) and len(subject) > len(lead) else ""


def parse_dead_letter(subject: str, headers: Mapping[str, str] | None, prefix: str) -> DeadLetterHeaders:
    """Read back what ``build_dead_letter`` wrote (or what an older or foreign writer left: never raises)."""
    headers = headers or {}
    return DeadLetterHeaders(
        reason=headers.get(H_REASON, "").strip() or "unknown",
        detail=headers.get(H_DETAIL, ""),
        source_subject=source_subject_of(subject, headers, prefix),
        source_stream=headers.get(H_SOURCE_STREAM, ""),
        source_seq=_int_or_none(headers.get(H_SOURCE_SEQ)),
        delivered=_int_or_none(headers.get(H_DELIVERED)),
        truncated_from=_int_or_none(headers.get(H_TRUNCATED)),
        subject_escaped=headers.get(H_SOURCE_SUBJECT_ESCAPED, "").strip() == "true",
    )
