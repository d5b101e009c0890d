"""From one Sequin CDC message to its outcome and, when routed, the enriched event. Pure: no I/O.

``EventBuilder.plan`` is the whole per-message decision except deduplication: it never raises, and returns
``Skip``, ``Publish`` or ``DeadLetter``. The body is parsed with a pysimdjson ``Parser`` passed in by the caller,
because a parser is not thread-safe and each worker thread owns one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import orjson

from cdc_service.core.outcomes import DeadLetter, Outcome, PoisonError, Publish, Reason, Skip
from cdc_service.core.routes import COMPANY, Route
from cdc_service.core.subjects import SubjectInfo, SubjectLayout, token_problem

ACTIONS = frozenset({"insert", "update", "delete", "read"})
_ID_FIELDS_FIRST = ("agent_id", "message_id", "chat_id")
_MAX_ID_BYTES = 256
_SUBJECT_CACHE_SIZE = 10_000
_DRIFT_CACHE_SIZE = 1_000
_DRIFT_CACHE_COLUMNS = 256
Drift = tuple[tuple[str, ...], tuple[str, ...]]  # (columns not expected, expected columns absent)


def _missing(what: str) -> PoisonError:
    return PoisonError(Reason.MISSING_FIELD, f"{what} is missing or null")


def _id_text(value: Any, what: str) -> str:
    """An id as text: strings as they are, JSON integers as their decimal text. Anything else is poison."""
    if value is None:
        raise _missing(what)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise PoisonError(Reason.INVALID_SHAPE, f"{what} must be a string or an integer, got {_type_name(value)}")


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "null" if value is None else type(value).__name__


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise PoisonError(Reason.INVALID_SHAPE, f"{what} must be a non-negative integer, got {_type_name(value)}")


def _object(doc: Any, key: str) -> Any:
    value = doc.get(key)
    if value is None:
        raise _missing(key)
    if not isinstance(value, dict):
        raise PoisonError(Reason.INVALID_SHAPE, f"{key} must be a JSON object, got {_type_name(value)}")
    return value


# simdjson's codes, for what the standard parser accepts but simdjson does not; its own texts (e.g. "TAPE_ERROR ...
# This is a fatal and unrecoverable error") alarm operators and give no position.
_SIMDJSON_PLAIN = {
    "BIGINT_ERROR": "an integer does not fit in 64 bits",
    "NUMBER_ERROR": "a number is out of range",
    "DEPTH_ERROR": "it is nested too deeply",
}


def json_problem(data: bytes, exc: BaseException) -> str:
    """A plain reason for a body simdjson refused, with the byte offset where the standard parser stops.

    Runs only for bad input, so the second parse costs nothing on the hot path. Never quotes the body.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"body is not valid UTF-8 at byte {bad.start}"
    try:
        json.loads(text)
    except json.JSONDecodeError as bad:
        where = len(text[: bad.pos].encode("utf-8"))
        what = bad.msg[:1].lower() + bad.msg[1:]
        return f"body is not valid JSON: {what} at byte {where} (line {bad.lineno}, column {bad.colno})"
    except RecursionError:
        return "body cannot be parsed: it is nested too deeply"
    except ValueError:
        pass
    code = str(exc).split(":", 1)[0].strip()
    return f"body cannot be parsed: {_SIMDJSON_PLAIN.get(code, 'the parser refused it')}"


def column_drift(columns: Iterable[str], expected: frozenset[str]) -> Drift:
    """(columns not expected, expected columns absent), each sorted."""
    present = set(columns)
    return tuple(sorted(present - expected)), tuple(sorted(expected - present))


def commit_time(value: Any) -> float | None:
    """Unix seconds of an ISO 8601 ``commit_timestamp``, or ``None`` when it is absent or unreadable."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class EventBuilder:
    """Decides the outcome of one inbound message from its subject and body."""

    __slots__ = ("_drifts", "_layout", "_max_payload_bytes", "_routes", "_subjects")

    def __init__(self, layout: SubjectLayout, routes: Mapping[str, Route], max_payload_bytes: int) -> None:
        self._layout = layout
        self._routes = dict(routes)
        self._max_payload_bytes = max_payload_bytes
        self._subjects: dict[str, SubjectInfo | str] = {}
        self._drifts: dict[tuple[str, ...], Drift] = {}

    def _parse_subject(self, subject: str) -> SubjectInfo | str:
        # Subjects repeat (companies x tables), so their parse is remembered; the bound keeps a flood of distinct
        # subjects from growing it without limit.
        info = self._subjects.get(subject)
        if info is None:
            if len(self._subjects) >= _SUBJECT_CACHE_SIZE:
                self._subjects.clear()
            info = self._subjects[subject] = self._layout.parse(subject)
        return info

    def table_of(self, subject: str) -> str:
        """The table a subject names, or ``""`` when it does not fit the layout (for metric labels)."""
        info = self._parse_subject(subject)
        return info.table if isinstance(info, SubjectInfo) else ""

    def plan(self, subject: str, data: bytes, parser: Any) -> Outcome:
        """Return the outcome for one message; never raises for any subject or body."""
        info = self._parse_subject(subject)
        if not isinstance(info, SubjectInfo):
            return DeadLetter("", Reason.INVALID_SUBJECT, info)
        route = self._routes.get(info.table)
        if route is None:
            # F-2: unrouted tables are acknowledged without looking at the body.
            return Skip(info.table)
        try:
            return self._build(info, route, data, parser)
        except PoisonError as exc:
            return DeadLetter(info.table, exc.reason, exc.detail)

    def _build(self, info: SubjectInfo, route: Route, data: bytes, parser: Any) -> Publish:
        if len(data) > self._max_payload_bytes:
            raise PoisonError(
                Reason.PAYLOAD_TOO_LARGE, f"body is {len(data)} bytes, limit is {self._max_payload_bytes}"
            )
        try:
            # Fully materialised (recursive): measured faster here than lazy element access plus simdjson's
            # minifier for row_data, and no document can outlive the parser's next parse.
            doc = parser.parse(data, True)
        except (ValueError, RuntimeError, TypeError) as exc:  # pysimdjson: bad JSON, UTF-8, depth, big integers
            raise PoisonError(Reason.INVALID_JSON, json_problem(data, exc)) from None
        if not isinstance(doc, dict):
            raise PoisonError(Reason.INVALID_SHAPE, f"body must be a JSON object, got {_type_name(doc)}")
        record = _object(doc, "record")
        metadata = _object(doc, "metadata")

        action = doc.get("action")
        if action is None:
            raise _missing("action")
        if not isinstance(action, str) or action not in ACTIONS:
            shown = action if isinstance(action, str) else _type_name(action)
            raise PoisonError(Reason.INVALID_SHAPE, f"action {shown!r:.60} is not one of {', '.join(sorted(ACTIONS))}")

        table_name = metadata.get("table_name")
        if table_name is not None and table_name != info.table:
            raise PoisonError(
                Reason.TABLE_MISMATCH, f"metadata.table_name {str(table_name)!r:.80} differs from subject table"
            )

        lsn_value = metadata.get("commit_lsn")
        if lsn_value is None:
            if action != "read":
                raise _missing("metadata.commit_lsn")
            lsn = "0"  # backfill rows carry no LSN
        else:
            lsn = str(_non_negative_int(lsn_value, "metadata.commit_lsn"))
        idx_value = metadata.get("commit_idx")
        if idx_value is not None:
            # Two changes to one row in one transaction share commit_lsn; the index keeps their ids apart.
            lsn = f"{lsn}.{_non_negative_int(idx_value, 'metadata.commit_idx')}"

        record_company = record.get("company_id")
        if self._layout.has_company:
            company = info.company or ""
            if record_company is not None and _id_text(record_company, "record.company_id") != company:
                raise PoisonError(Reason.TENANT_MISMATCH, "record.company_id differs from the subject's company")
        else:
            company = _id_text(record_company, "record.company_id")
        problem = token_problem(company)
        if problem:
            raise PoisonError(Reason.INVALID_SUBJECT_TOKEN, f"company {problem}")

        values = {COMPANY: company}
        for name in route.row_fields:
            text = _id_text(record.get(name), f"record.{name}")
            if name in route.subject_fields:
                problem = token_problem(text)
                if problem:
                    raise PoisonError(Reason.INVALID_SUBJECT_TOKEN, f"record.{name} {problem}")
            elif not text or len(text.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES or not text.isprintable():
                # The pk travels in the Nats-Msg-Id header and the Redis key: no control characters, bounded.
                raise PoisonError(Reason.INVALID_SHAPE, f"record.{name} is empty, too long or not printable")
            values[name] = text

        event_id = f"{lsn}:{info.table}:{values[route.pk]}"
        head: dict[str, str] = {"event_id": event_id, "company_id": company}
        for name in _ID_FIELDS_FIRST:
            if name in values:
                head[name] = values[name]
        for name in route.row_fields:
            head.setdefault(name, values[name])
        head["action"] = action
        event_time = metadata.get("commit_timestamp")
        if isinstance(event_time, str):
            head["event_time"] = event_time
        try:
            payload = orjson.dumps({**head, "row_data": record})
        except (TypeError, orjson.JSONEncodeError) as exc:  # nesting past orjson's 254 levels (simdjson allows 1024)
            raise PoisonError(Reason.INVALID_JSON, f"record cannot be re-encoded: {exc}"[:300]) from None
        event = Publish(info.table, event_id, route.subject(values), payload, commit_time(event_time))
        expected = route.columns
        # One set comparison per event when a table lists its columns; deletes may carry only the replica identity.
        if expected is not None and action != "delete" and record.keys() != expected:
            event.drift = self._drift_of(info.table, record, expected)
        return event

    def _drift_of(self, table: str, record: dict[str, Any], expected: frozenset[str]) -> Drift:
        # A drifting table sends the same shape row after row: work out each shape's drift once. Bounded memory:
        # at most _DRIFT_CACHE_SIZE shapes of at most _DRIFT_CACHE_COLUMNS columns each.
        if len(record) > _DRIFT_CACHE_COLUMNS:
            return column_drift(record, expected)
        shape = (table, *record)
        drift = self._drifts.get(shape)
        if drift is None:
            if len(self._drifts) >= _DRIFT_CACHE_SIZE:
                self._drifts.clear()
            drift = self._drifts[shape] = column_drift(record, expected)
        return drift
