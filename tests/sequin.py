"""Sequin CDC message bodies for tests and benchmarks; the sample rows live in ``cdc_service.testing``."""

from __future__ import annotations

import json
from typing import Any

from cdc_service.testing import sample_record, sequin_message


def record(table: str, **overrides: Any) -> dict[str, Any]:
    return sample_record(table, **overrides)


def body(
    table: str = "messages",
    *,
    lsn: int | None = 1000,
    idx: int | None = None,
    action: str = "insert",
    commit_timestamp: str = "2026-11-27T04:00:00.123456Z",
    **record_overrides: Any,
) -> dict[str, Any]:
    row = sample_record(table, **record_overrides)
    return sequin_message(table, row, lsn=lsn, idx=idx, action=action, commit_timestamp=commit_timestamp)


def encode(doc: Any) -> bytes:
    return json.dumps(doc).encode()
