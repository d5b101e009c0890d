"""Partitioned ordering: the subject transform, the spreading of partitions over replicas, the server check. Pure.

In ``ingest.ordering = "partitioned"`` a stream sourced from the input stream stores every event under
``<partition>.<original subject>``, where the partition is a hash of the ordering key (the company token, or the
schema token in the Sequin layout) computed by the server's ``partition(n, ...)`` transform. One durable per
partition delivers that partition's events in stream order to one pinned replica at a time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cdc_service.core.subjects import SubjectLayout

PRIORITY_GROUP = "cdc"
MIN_SERVER = (2, 11)  # pull-consumer priority groups with the pinned_client policy (ADR-42)
ORDERING_KEYS = ("company", "schema")

_VERSION = re.compile(r"^v?(\d+)\.(\d+)")
_MEMBER_SAFE = re.compile(r"[-_a-zA-Z0-9]")


class PartitionError(ValueError):
    """The subjects or layout cannot be partitioned; the message says why."""


def ordering_key(layout: SubjectLayout) -> tuple[str, int]:
    """The token events are ordered by and its position in the layout: the company, else the schema."""
    for name in ORDERING_KEYS:
        position = layout.position(name)
        if position is not None:
            return name, position
    raise PartitionError(f"layout {layout.text!r} has neither {{company}} nor {{schema}} to order by")


def transform(pattern: str, layout: SubjectLayout, partitions: int) -> str:
    """The destination of the subject transform for one input subject pattern.

    ``cdc.*.*`` with layout ``cdc.{company}.{table}`` and 8 partitions gives
    ``{{partition(8,1)}}.cdc.{{wildcard(1)}}.{{wildcard(2)}}``: the partition first, then the subject unchanged.
    """
    if partitions < 1:
        raise PartitionError(f"partition count {partitions} is below 1")
    name, position = ordering_key(layout)
    tokens = pattern.split(".")
    if position >= len(tokens) or tokens[position] != "*":
        raise PartitionError(
            f"{pattern!r} must have '*' at the {{{name}}} token (token {position + 1}) to be partitioned by it"
        )
    dest: list[str] = []
    wildcard = 0
    key_wildcard = 0
    for index, token in enumerate(tokens):
        if token == "*":
            wildcard += 1
            dest.append(f"{{{{wildcard({wildcard})}}}}")
            if index == position:
                key_wildcard = wildcard
        else:
            dest.append(token)  # a literal, or a trailing '>' that the transform carries over as it is
    return ".".join([f"{{{{partition({partitions},{key_wildcard})}}}}", *dest])


def filter_subject(partition: int) -> str:
    """The subjects of one partition in the partitioned stream."""
    return f"{partition}.>"


def original_subject(subject: str) -> str:
    """The input subject an event was published to: the partitioned subject without its partition token."""
    return subject.partition(".")[2]


def assign(partitions: int, members: Sequence[str]) -> dict[int, str]:
    """Which member owns each partition: round robin over the members in sorted order.

    Every replica computes this from the same membership and gets the same answer; counts differ by at most one.
    An empty membership owns nothing.
    """
    ordered = sorted(set(members))
    if not ordered:
        return {}
    return {p: ordered[p % len(ordered)] for p in range(partitions)}


def server_version(version: str) -> tuple[int, int] | None:
    """(major, minor) from a server's INFO ``version``, or None when it cannot be read."""
    match = _VERSION.match(version.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def supports_partitions(version: str) -> bool:
    """Whether the server has pull-consumer priority groups (2.11+). An unreadable version is not trusted."""
    parsed = server_version(version)
    return parsed is not None and parsed >= MIN_SERVER


def member_id(host: str, pid: int) -> str:
    """A membership key for this process (``<host>.<pid>``): stable across a container restart in one pod (same
    hostname, same pid), distinct for two processes on one host. Characters a KV key cannot hold are written as
    ``=XX`` per UTF-8 byte ('=' itself included), so two hostnames never give one key."""
    encoded = "".join(c if _MEMBER_SAFE.fullmatch(c) else "".join(f"={b:02X}" for b in c.encode()) for c in host[:100])
    return f"{encoded or '=00'}.{pid}"
