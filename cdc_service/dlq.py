"""Dead-letter tools: ``python -m cdc_service dlq list|show|replay|purge``.

``list`` and ``show`` read the dead-letter stream without consuming it (direct reads by sequence; nothing is acked or
deleted). ``replay`` re-publishes each selected message's original bytes to its source subject, expecting the source
stream (``ingest.stream``), and deletes the dead letter only after that stream's PubAck. On the first failure it
stops: what was not confirmed stays in the dead-letter stream. ``purge`` deletes selected dead letters.

Exit codes (every command): 0 done; 1 a failure, one line on stderr (NATS unreachable, a stream missing, a replay or
purge stopped part-way); 2 a usage error or a bad setting; 3 a sequence given with ``SEQ`` or ``--seq`` is not in the
dead-letter stream (the others were still handled). A reader that stops early (``| head``) ends the output quietly
with 0.

The top half is pure (turning a stored message into a row and formatting it) and unit-tested; the bottom half talks
to NATS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import nats
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from cdc_service.adapters.nats_jetstream import connect_options
from cdc_service.config import Settings, mask_url
from cdc_service.core.dead_letters import parse_dead_letter

PREVIEW_CHARS = 80
DETAIL_CHARS = 60  # of Cdc-Error-Detail in the table; --json and show have all of it

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


# ---------------------------------------------------------------------------------------------------------------
# Pure part: rows and formatting


@dataclass(frozen=True)
class DeadLetterEntry:
    """One message of the dead-letter stream, as the tools see it."""

    seq: int
    subject: str
    reason: str
    detail: str
    source_subject: str  # "" when neither the header nor the subject names it
    source_stream: str
    source_seq: int | None
    delivered: int | None
    stored_at: float | None  # unix seconds, from the stream's own timestamp
    data: bytes
    truncated_from: int | None = None  # original size when the body was cut to fit
    subject_escaped: bool = False  # source_subject is an escaped rendering, not the subject's own bytes


def entry_from_message(
    seq: int,
    subject: str,
    headers: Mapping[str, str] | None,
    data: bytes | None,
    stored_at: datetime | float | None,
    prefix: str,
) -> DeadLetterEntry:
    """A stored dead letter as a row; its headers are read by ``core.dead_letters.parse_dead_letter``."""
    when = stored_at.timestamp() if isinstance(stored_at, datetime) else stored_at
    fields = parse_dead_letter(subject, headers, prefix)
    return DeadLetterEntry(
        seq=seq,
        subject=subject,
        reason=fields.reason,
        detail=fields.detail,
        source_subject=fields.source_subject,
        source_stream=fields.source_stream,
        source_seq=fields.source_seq,
        delivered=fields.delivered,
        stored_at=when,
        data=data or b"",
        truncated_from=fields.truncated_from,
        subject_escaped=fields.subject_escaped,
    )


def _escape(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, kept by ``surrogateescape``
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def preview(data: bytes, limit: int = PREVIEW_CHARS) -> str:
    """At most ``limit`` characters of the body on one line: invalid UTF-8 as ``\\xNN``, control and other
    non-printable characters escaped (``\\n``, ``\\t``, ``\\x00``, ``\\u200b``); a cut body ends with ``…``.
    An escape is never cut in half."""
    chunk = data[: limit * 4]  # enough bytes for ``limit`` characters
    pieces = [_escape(c) for c in chunk.decode("utf-8", errors="surrogateescape")]
    whole = "".join(pieces)
    if len(whole) <= limit and len(chunk) == len(data):
        return whole
    out: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > limit - 1:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out) + "…"


def format_age(seconds: float) -> str:
    """A compact age: ``42s``, ``5m07s``, ``3h05m``, ``2d04h``; negative (clock skew) is ``0s``."""
    total = max(0, int(seconds))
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def age_of(entry: DeadLetterEntry, now: float) -> str:
    return format_age(now - entry.stored_at) if entry.stored_at is not None else "?"


def format_row(entry: DeadLetterEntry, now: float) -> tuple[str, str, str, str, str, str]:
    """(seq, age, reason, source subject, detail, preview) for the table."""
    return (
        str(entry.seq),
        age_of(entry, now),
        entry.reason,
        entry.source_subject or f"? ({entry.subject})",
        preview(entry.detail.encode(), DETAIL_CHARS) if entry.detail else "-",
        preview(entry.data),
    )


HEADER = ("SEQ", "AGE", "REASON", "SUBJECT", "DETAIL", "PREVIEW")


def format_table(entries: Sequence[DeadLetterEntry], now: float) -> list[str]:
    """Aligned lines, a header first; the preview is last so long ones do not push the other columns."""
    rows = [HEADER, *(format_row(e, now) for e in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]


def entry_json(entry: DeadLetterEntry, now: float) -> dict[str, Any]:
    """One ``--json`` line: everything the headers say, the age, the size and the preview (never the whole body)."""
    return {
        "seq": entry.seq,
        "subject": entry.subject,
        "reason": entry.reason,
        "detail": entry.detail,
        "source_subject": entry.source_subject,
        "source_stream": entry.source_stream,
        "source_seq": entry.source_seq,
        "delivered": entry.delivered,
        "stored_at": entry.stored_at,
        "age_seconds": None if entry.stored_at is None else round(max(0.0, now - entry.stored_at), 3),
        "size": len(entry.data),
        "preview": preview(entry.data),
    }


def matches(
    entry: DeadLetterEntry, reasons: Collection[str], older_than: float | None = None, now: float = 0.0
) -> bool:
    """``entry`` has one of ``reasons`` (any when empty) and, with ``older_than``, was stored that many seconds or
    more before ``now`` (an entry without a stored time never matches an age)."""
    if reasons and entry.reason not in reasons:
        return False
    if older_than is not None:
        return entry.stored_at is not None and now - entry.stored_at >= older_than
    return True


def show_lines(entry: DeadLetterEntry, headers: Mapping[str, str], now: float) -> list[str]:
    """``dlq show``: where it is from, every header, then the body: indented when it is JSON, else on escaped lines
    (invalid UTF-8 as ``\\xNN``, control characters escaped); never raw terminal control bytes."""
    lines = [
        f"seq:      {entry.seq}",
        f"subject:  {_escaped(entry.subject)}",
        f"stored:   {_stored_text(entry.stored_at)} ({age_of(entry, now)} ago)",
        "headers:",
        *(f"  {_escaped(name)}: {_escaped(value)}" for name, value in headers.items()),
    ]
    size = f"{len(entry.data)} bytes"
    if entry.truncated_from is not None:
        size += f", cut from {entry.truncated_from}; the original is message {entry.source_seq} of the source stream"
    pretty = _pretty_json(entry.data)
    if pretty is None:
        lines.append(f"body ({size}, not JSON; escaped):")
        lines.extend(_escaped(line) for line in entry.data.decode("utf-8", "surrogateescape").split("\n"))
    else:
        lines.append(f"body ({size}, JSON, indented):")
        lines.extend(_escaped(line) for line in pretty.split("\n"))
    return lines


def _escaped(text: str) -> str:
    return "".join(_escape(c) for c in text)


def _stored_text(stored_at: float | None) -> str:
    if stored_at is None:
        return "?"
    return datetime.fromtimestamp(stored_at, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _pretty_json(data: bytes) -> str | None:
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    try:
        return json.dumps(doc, indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return None


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` (or a bare number of seconds) in seconds; ``ValueError`` otherwise."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"expected a duration such as 90s, 30m, 12h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_seqs(text: str) -> list[int]:
    """``5`` or ``5,7,12`` (spaces allowed), in the order given, without repeats; ``ValueError`` otherwise."""
    seqs: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not (part.isascii() and part.isdigit()) or int(part) < 1:
            raise ValueError(f"expected stream sequences such as 5 or 5,7,12, got {text!r}")
        if int(part) not in seqs:
            seqs.append(int(part))
    return seqs


def replay_problem(entry: DeadLetterEntry, source_stream: str) -> str:
    """Why ``entry`` cannot be replayed into ``source_stream`` ("" when it can)."""
    if not entry.source_subject:
        return "no Cdc-Source-Subject header and the subject lacks the dead-letter prefix"
    if entry.source_stream and entry.source_stream != source_stream:
        return f"it came from stream {entry.source_stream}, not {source_stream} (ingest.stream)"
    if entry.subject_escaped:
        return "its source subject is not printable UTF-8 (shown escaped); it cannot be published again"
    if entry.truncated_from is not None:
        return (
            f"its body was cut from {entry.truncated_from} bytes to fit the dead-letter stream; the original is "
            f"message {entry.source_seq} of {entry.source_stream or source_stream}"
        )
    return ""


def replay_msg_id(dlq_stream: str, entry: DeadLetterEntry) -> str:
    """``Nats-Msg-Id`` of a replay: a replay interrupted between the PubAck and the delete can be run again within the
    source stream's duplicate window without storing the message twice. The stored time keeps it unique even when
    the dead-letter stream is recreated and its sequences start again."""
    stamp = "" if entry.stored_at is None else f":{round(entry.stored_at * 1_000_000)}"
    return f"replay:{dlq_stream}:{entry.seq}{stamp}"


# ---------------------------------------------------------------------------------------------------------------
# NATS part


class ToolError(RuntimeError):
    """A failure the tool reports in one line and exits 1 on."""


async def _connect(settings: Settings) -> Client:
    options = connect_options(settings.nats)
    # A command line tool: try each server a bounded number of times instead of forever, and report, do not log.
    options.update(name=f"{settings.nats.name}-dlq", max_reconnect_attempts=1, reconnect_time_wait=0.5)
    errors: list[str] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(f"{type(exc).__name__}: {exc}".strip())

    bound = settings.nats.connect_timeout * 2 * max(1, len(settings.nats.url)) + 5
    try:
        return await asyncio.wait_for(nats.connect(**options, error_cb=error_cb), bound)
    except Exception as exc:
        servers = ", ".join(mask_url(u) for u in settings.nats.url)
        cause = errors[-1] if errors else f"{type(exc).__name__}: {exc}".strip()
        raise ToolError(f"cannot connect to NATS at {servers}: {cause}") from None


async def _stream_bounds(js: JetStreamContext, stream: str) -> tuple[int, int, int]:
    """(first_seq, last_seq, messages) of the dead-letter stream; ``ToolError`` when it does not exist."""
    try:
        info = await js.stream_info(stream)
    except NotFoundError:
        raise ToolError(f"dead-letter stream {stream} (dlq.stream) does not exist on this server") from None
    state = info.state
    return int(state.first_seq), int(state.last_seq), int(state.messages)


async def read_entries(js: JetStreamContext, stream: str, prefix: str) -> AsyncIterator[DeadLetterEntry]:
    """Every message in ``stream``, oldest first, as it stood when the call began; nothing is consumed."""
    first, last, messages = await _stream_bounds(js, stream)
    if messages == 0:
        return
    seq = max(1, first)
    while seq <= last:
        try:
            # The next stored message at or after ``seq``: skips the gaps replays leave, one request per message.
            msg = await js.get_msg(stream, seq, subject=">", next=True)
        except NotFoundError:
            return
        if msg.seq is None or msg.seq > last:
            return
        yield entry_from_message(msg.seq, msg.subject or "", msg.headers, msg.data, msg.time, prefix)
        seq = msg.seq + 1


async def read_one(js: JetStreamContext, stream: str, seq: int, prefix: str) -> tuple[DeadLetterEntry, dict[str, str]]:
    """The dead letter at ``seq`` and its headers; ``NotFoundError`` when there is none."""
    msg = await js.get_msg(stream, seq)
    headers = dict(msg.headers or {})
    return entry_from_message(seq, msg.subject or "", headers, msg.data, msg.time, prefix), headers


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command works on: all of them, filtered by reason and age, or the given sequences."""

    reasons: frozenset[str] = frozenset()
    limit: int | None = None
    seqs: tuple[int, ...] = ()
    older_than: float | None = None  # seconds
    missing: list[int] = field(default_factory=list, compare=False)  # requested sequences that were not there


async def _selected(js: JetStreamContext, settings: Settings, selection: Selection) -> AsyncIterator[DeadLetterEntry]:
    limit = selection.limit
    if limit is not None and limit < 1:
        return
    stream, prefix, now = settings.dlq.stream, settings.dlq.subject_prefix, time.time()
    if selection.seqs:
        entries = []
        for seq in selection.seqs:
            try:
                entries.append((await read_one(js, stream, seq, prefix))[0])
            except NotFoundError:
                selection.missing.append(seq)
        found: AsyncIterator[DeadLetterEntry] = _iterate(entries)
    else:
        found = read_entries(js, stream, prefix)
    taken = 0
    async for entry in found:
        if matches(entry, selection.reasons, selection.older_than, now):
            yield entry
            taken += 1
            if limit is not None and taken >= limit:
                return


async def _iterate(entries: Sequence[DeadLetterEntry]) -> AsyncIterator[DeadLetterEntry]:
    for entry in entries:
        yield entry


def _not_found(selection: Selection, stream: str, err: TextIO) -> int:
    if not selection.missing:
        return EXIT_OK
    listed = ",".join(str(seq) for seq in selection.missing)
    err.write(f"no dead letter with sequence {listed} in {stream}\n")
    return EXIT_NOT_FOUND


async def list_command(settings: Settings, selection: Selection, as_json: bool, out: TextIO, err: TextIO) -> int:
    nc = await _connect(settings)
    try:
        js = nc.jetstream(timeout=settings.publish.timeout)
        _, _, total = await _stream_bounds(js, settings.dlq.stream)
        now = time.time()
        entries: list[DeadLetterEntry] = []
        async for entry in _selected(js, settings, selection):
            if as_json:
                out.write(orjson.dumps(entry_json(entry, now)).decode() + "\n")
            else:
                entries.append(entry)
        if not as_json:
            for line in format_table(entries, now):
                out.write(line.rstrip() + "\n")
            out.write(f"{len(entries)} shown, {total} in {settings.dlq.stream}\n")
        out.flush()
    finally:
        await nc.close()
    return _not_found(selection, settings.dlq.stream, err)


async def show_command(settings: Settings, seq: int, raw: bool, out: TextIO, err: TextIO) -> int:
    nc = await _connect(settings)
    try:
        js = nc.jetstream(timeout=settings.publish.timeout)
        await _stream_bounds(js, settings.dlq.stream)
        try:
            entry, headers = await read_one(js, settings.dlq.stream, seq, settings.dlq.subject_prefix)
        except NotFoundError:
            return _not_found(Selection(missing=[seq]), settings.dlq.stream, err)
    finally:
        await nc.close()
    if raw:
        out.flush()
        buffer = getattr(out, "buffer", None)
        if buffer is not None:
            buffer.write(entry.data)
        else:
            out.write(entry.data.decode(errors="replace"))
    else:
        out.write("\n".join(show_lines(entry, headers, time.time())) + "\n")
    out.flush()
    return EXIT_OK


async def replay_command(settings: Settings, selection: Selection, dry_run: bool, out: TextIO, err: TextIO) -> int:
    dlq_stream, source_stream = settings.dlq.stream, settings.ingest.stream
    replayed = failed = skipped = 0
    nc = await _connect(settings)
    try:
        js = nc.jetstream(timeout=settings.publish.timeout)
        await _stream_bounds(js, dlq_stream)
        if not dry_run:
            try:
                await js.stream_info(source_stream)
            except NotFoundError:
                raise ToolError(
                    f"source stream {source_stream} (ingest.stream) does not exist; nothing replayed or removed"
                ) from None
        async for entry in _selected(js, settings, selection):
            line = f"seq={entry.seq} reason={entry.reason} subject={entry.source_subject or entry.subject}"
            problem = replay_problem(entry, source_stream)
            if problem:
                skipped += 1
                out.write(f"skipped {line}: {problem}\n")
                continue
            if dry_run:
                replayed += 1
                out.write(f"would replay {line} ({len(entry.data)} bytes) to {source_stream}\n")
                continue
            try:
                ack = await js.publish(
                    entry.source_subject,
                    entry.data,
                    stream=source_stream,
                    headers={"Nats-Msg-Id": replay_msg_id(dlq_stream, entry)},
                )
            except Exception as exc:
                failed += 1
                err.write(
                    f"cdc_service dlq replay: {source_stream} did not accept dead letter {line}: "
                    f"{type(exc).__name__}: {exc}; stopped, it and the rest stay in {dlq_stream}\n"
                )
                break
            try:
                await js.delete_msg(dlq_stream, entry.seq)
            except Exception as exc:
                failed += 1
                err.write(
                    f"cdc_service dlq replay: dead letter {line} was replayed ({source_stream} seq {ack.seq}) but "
                    f"could not be removed from {dlq_stream}: {type(exc).__name__}: {exc}; stopped, a later replay "
                    "would publish it again\n"
                )
                break
            replayed += 1
            note = " (already there: duplicate)" if ack.duplicate else ""
            out.write(f"replayed {line} -> {source_stream} seq {ack.seq}{note}\n")
    finally:
        await nc.close()
    if dry_run:
        out.write(f"dry run: would_replay={replayed} skipped={skipped}; nothing published or removed\n")
    else:
        out.write(f"replayed={replayed} failed={failed} skipped={skipped}\n")
    return _exit_code(failed, selection, dlq_stream, out, err)


def _exit_code(failed: int, selection: Selection, stream: str, out: TextIO, err: TextIO) -> int:
    """The exit status of a command that acted on a selection of dead letters: ``EXIT_FAILED`` when an action
    failed, else what ``_not_found`` says of sequences asked for but not there. Flushes both outputs first."""
    out.flush()
    err.flush()
    if failed:
        return EXIT_FAILED
    return _not_found(selection, stream, err)


async def purge_command(settings: Settings, selection: Selection, dry_run: bool, out: TextIO, err: TextIO) -> int:
    """Delete the selected dead letters (one delete per message, so the selection is exact); stops at the first
    failure."""
    stream = settings.dlq.stream
    purged = failed = 0
    now = time.time()
    nc = await _connect(settings)
    try:
        js = nc.jetstream(timeout=settings.publish.timeout)
        await _stream_bounds(js, stream)
        async for entry in _selected(js, settings, selection):
            line = (
                f"seq={entry.seq} reason={entry.reason} subject={entry.source_subject or entry.subject} "
                f"age={age_of(entry, now)}"
            )
            if dry_run:
                purged += 1
                out.write(f"would purge {line}\n")
                continue
            try:
                await js.delete_msg(stream, entry.seq)
            except NotFoundError:
                out.write(f"already gone {line}\n")  # removed meanwhile (replayed, expired, another purge)
                continue
            except Exception as exc:
                failed += 1
                err.write(
                    f"cdc_service dlq purge: could not remove dead letter {line}: {type(exc).__name__}: {exc}; "
                    "stopped, it and the rest stay\n"
                )
                break
            purged += 1
            out.write(f"purged {line}\n")
    finally:
        await nc.close()
    if dry_run:
        out.write(f"dry run: would_purge={purged}; nothing removed\n")
    else:
        out.write(f"purged={purged} failed={failed}\n")
    return _exit_code(failed, selection, stream, out, err)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seqs(text: str) -> list[int]:
    try:
        return parse_seqs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


EXIT_CODES = """\
exit status: 0 done; 1 a failure (one line on stderr: NATS unreachable, a stream missing, a replay or purge stopped
part-way); 2 a usage error or a bad setting; 3 a sequence given is not in the dead-letter stream (the others were
still handled). Output cut short by its reader (| head) ends quietly with 0.
"""

LIST_HELP = (
    """\
Print the dead-letter stream (dlq.stream), oldest first, without consuming or changing it: sequence, age, reason
(Cdc-Error-Reason), source subject, the start of the detail (Cdc-Error-Detail) and of the body (non-printable
characters escaped). --json prints one JSON object per message instead, with the whole detail, source stream and
sequence, and size. `dlq show SEQ` prints one message in full.

"""
    + EXIT_CODES
)

SHOW_HELP = (
    """\
Print one dead letter: its subject, when it was stored, every header, and the body: indented when it is JSON,
otherwise line by line with invalid UTF-8 and control characters escaped. --raw writes the body's bytes as they are
(for a file or another tool). Nothing is consumed or changed.

"""
    + EXIT_CODES
)

REPLAY_HELP = (
    """\
Re-publish dead-lettered messages, oldest first, to their source subject (Cdc-Source-Subject) in the source stream
(ingest.stream), byte for byte. Each is removed from the dead-letter stream only after the source stream confirmed
it (PubAck). On the first failure the replay stops: that message and the rest stay, and the exit status is 1.
Prints one line per message and a summary: replayed=N failed=M skipped=K. Skipped messages (no source subject, or
from another source stream) are left in place.

Replay after fixing the cause (e.g. raising ingest.max_payload_bytes for payload_too_large). A message that is still
invalid, such as invalid_json, is simply dead-lettered again, under a new sequence.

"""
    + EXIT_CODES
)

PURGE_HELP = (
    """\
Remove dead letters without replaying them: those with --seq, or matching --reason and --older-than (both must hold
when both are given). At least one of them is required; there is no "purge everything" (delete the stream for
that). Prints one line per message and a summary: purged=N failed=M. --dry-run shows what would go.

"""
    + EXIT_CODES
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``dlq list``, ``show``, ``replay`` and ``purge`` to the top-level subparsers ``commands``."""
    raw = argparse.RawDescriptionHelpFormatter
    dlq = commands.add_parser(
        "dlq",
        help="list, show, replay or purge dead-lettered messages",
        description="Dead-letter tools. Settings (CDC_NATS__URL, dlq.stream, ingest.stream, ...) as for run.\n\n"
        + EXIT_CODES,
        formatter_class=raw,
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="{list,show,replay,purge}", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="R",
        help="only messages with this Cdc-Error-Reason (repeat for several)",
    )
    common.add_argument("--limit", type=_positive, metavar="N", help="at most N matching messages, oldest first")
    by_seq = argparse.ArgumentParser(add_help=False)
    by_seq.add_argument(
        "--seq",
        type=_seqs,
        default=[],
        metavar="SEQ[,SEQ...]",
        help="only these dead-letter sequences (the SEQ column), in the order given",
    )
    older = argparse.ArgumentParser(add_help=False)
    older.add_argument(
        "--older-than", type=_duration, metavar="AGE", help="only messages stored at least AGE ago (90s, 30m, 12h, 7d)"
    )
    listing = actions.add_parser(
        "list", parents=[common, older], help="show dead letters", description=LIST_HELP, formatter_class=raw
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    show = actions.add_parser("show", help="print one dead letter in full", description=SHOW_HELP, formatter_class=raw)
    show.add_argument("seq", type=_positive, metavar="SEQ", help="its sequence in the dead-letter stream")
    show.add_argument("--raw", action="store_true", help="write the body's bytes as they are, nothing else")
    replay = actions.add_parser(
        "replay",
        parents=[common, by_seq],
        help="re-publish dead letters to their source subject",
        description=REPLAY_HELP,
        formatter_class=raw,
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="show what would be replayed; publish and remove nothing"
    )
    purge = actions.add_parser(
        "purge",
        parents=[common, by_seq, older],
        help="remove dead letters without replaying them",
        description=PURGE_HELP,
        formatter_class=raw,
    )
    purge.add_argument("--dry-run", action="store_true", help="show what would be removed; remove nothing")


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(
        reasons=frozenset(args.reason),
        limit=args.limit,
        seqs=tuple(getattr(args, "seq", None) or ()),
        older_than=getattr(args, "older_than", None),
    )


def main(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``dlq`` command; the exit status is one of ``EXIT_CODES``."""
    command = args.dlq_command
    out, err = sys.stdout, sys.stderr
    if command == "purge" and not (args.seq or args.reason or args.older_than is not None):
        print("cdc_service dlq purge: give --seq, --reason or --older-than (nothing removed)", file=err)
        return EXIT_USAGE
    try:
        if command == "list":
            return asyncio.run(list_command(settings, _selection(args), args.json, out, err))
        if command == "show":
            return asyncio.run(show_command(settings, args.seq, args.raw, out, err))
        if command == "replay":
            return asyncio.run(replay_command(settings, _selection(args), args.dry_run, out, err))
        return asyncio.run(purge_command(settings, _selection(args), args.dry_run, out, err))
    except BrokenPipeError:
        # The reader went away (`| head -1`): not our failure. Point stdout at /dev/null so the interpreter's own
        # flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK
    except ToolError as exc:
        _flush_quietly(out)
        print(f"cdc_service dlq {command}: {exc}", file=err)
        return EXIT_FAILED
    except Exception as exc:  # NATS timeouts and the like: one line, not a traceback
        _flush_quietly(out)
        print(f"cdc_service dlq {command}: {type(exc).__name__}: {exc}", file=err)
        return EXIT_FAILED


def _flush_quietly(out: TextIO) -> None:
    try:
        out.flush()
    except BrokenPipeError:
        pass
