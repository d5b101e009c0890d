"""Partitioned ordering, the pure part: subject transforms, assignment, server versions, member ids."""

from __future__ import annotations

from collections import Counter

import pytest

from cdc_service.core.partitions import (
    PartitionError,
    assign,
    filter_subject,
    member_id,
    ordering_key,
    original_subject,
    supports_partitions,
    transform,
)
from cdc_service.core.subjects import SubjectLayout

CDC = SubjectLayout("cdc.{company}.{table}")
SEQUIN = SubjectLayout("sequin.changes.{database}.{schema}.{table}.{action}")


@pytest.mark.parametrize(
    ("pattern", "layout", "partitions", "dest"),
    [
        ("cdc.*.*", CDC, 8, "{{partition(8,1)}}.cdc.{{wildcard(1)}}.{{wildcard(2)}}"),
        ("cdc.*.messages", CDC, 3, "{{partition(3,1)}}.cdc.{{wildcard(1)}}.messages"),
        ("cdc.*.>", CDC, 4, "{{partition(4,1)}}.cdc.{{wildcard(1)}}.>"),
        # the Sequin layout orders by the schema: its wildcard is the second one
        (
            "sequin.changes.*.*.*.*",
            SEQUIN,
            16,
            "{{partition(16,2)}}.sequin.changes.{{wildcard(1)}}.{{wildcard(2)}}.{{wildcard(3)}}.{{wildcard(4)}}",
        ),
    ],
)
def test_transform(pattern: str, layout: SubjectLayout, partitions: int, dest: str) -> None:
    assert transform(pattern, layout, partitions) == dest


@pytest.mark.parametrize(
    ("pattern", "layout", "partitions", "problem"),
    [
        ("cdc.acme.*", CDC, 8, "must have '*' at the {company} token"),
        ("cdc.>", CDC, 8, "must have '*' at the {company} token"),
        ("cdc", CDC, 8, "must have '*' at the {company} token"),
        ("cdc.*.*", CDC, 0, "below 1"),
        ("x.*", SubjectLayout("x.{table}"), 2, "neither {company} nor {schema}"),
    ],
)
def test_transform_refuses(pattern: str, layout: SubjectLayout, partitions: int, problem: str) -> None:
    with pytest.raises(PartitionError, match=problem.replace("{", r"\{").replace("}", r"\}").replace("*", r"\*")):
        transform(pattern, layout, partitions)


def test_ordering_key_prefers_the_company() -> None:
    assert ordering_key(CDC) == ("company", 1)
    assert ordering_key(SEQUIN) == ("schema", 3)
    assert ordering_key(SubjectLayout("x.{schema}.{company}.{table}")) == ("company", 2)


def test_partitioned_subjects_round_trip() -> None:
    assert filter_subject(3) == "3.>"
    assert original_subject("3.cdc.acme.messages") == "cdc.acme.messages"


@pytest.mark.parametrize(
    ("partitions", "members", "expected"),
    [
        (4, [], {}),
        (3, ["a"], {0: "a", 1: "a", 2: "a"}),
        (4, ["b", "a"], {0: "a", 1: "b", 2: "a", 3: "b"}),  # sorted: every replica computes the same
        (4, ["a", "b", "a"], {0: "a", 1: "b", 2: "a", 3: "b"}),
    ],
)
def test_assign(partitions: int, members: list[str], expected: dict[int, str]) -> None:
    assert assign(partitions, members) == expected


@pytest.mark.parametrize("count", [1, 2, 3, 5, 7])
def test_assign_spreads_evenly(count: int) -> None:
    """A replica that started first keeps no more than its share."""
    members = [f"m{i}" for i in range(count)]
    shares = Counter(assign(16, members).values())
    assert set(shares) == set(members)
    assert max(shares.values()) - min(shares.values()) <= 1


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("2.11.0", True),
        ("2.15.1", True),
        ("v2.12.3", True),
        ("3.0.0", True),
        ("2.10.22", False),
        ("2.9.0", False),
        ("1.99.0", False),
        ("2.11.0-RC.1", True),
        ("", False),
        ("unknown", False),
    ],
)
def test_supports_partitions(version: str, supported: bool) -> None:
    assert supports_partitions(version) is supported


@pytest.mark.parametrize(
    ("host", "pid", "expected"),
    [
        ("cdc-service-7d9f-abcde", 1, "cdc-service-7d9f-abcde.1"),
        ("a.b", 7, "a=2Eb.7"),
        ("a_b", 7, "a_b.7"),
        ("a=2Eb", 7, "a=3D2Eb.7"),
        ("", 3, "=00.3"),
        ("é", 1, "=C3=A9.1"),
    ],
)
def test_member_id(host: str, pid: int, expected: str) -> None:
    assert member_id(host, pid) == expected


def test_member_ids_of_different_hosts_differ() -> None:
    hosts = ["a.b", "a_b", "a=2Eb", "a-b", "a b", "a/b", "A.b"]
    assert len({member_id(h, 1) for h in hosts}) == len(hosts)
