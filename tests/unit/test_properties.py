"""Property tests: for any bytes or Sequin-shaped document on any subject, EventBuilder.plan returns exactly one
outcome and never raises, and BatchPreparer returns one outcome per message, in order."""

from __future__ import annotations

import json
import re
from typing import Any

import simdjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import DeadLetter, Publish, Retry, Skip
from cdc_service.core.subjects import SubjectLayout
from cdc_service.metrics import Metrics
from cdc_service.testing import FakeDedupStore, FakeMessage
from cdc_service.worker import BatchPreparer

# Deterministic in CI: the same examples on every run, no example database.
settings.register_profile(
    "cdc_properties", derandomize=True, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
PROFILE = settings.get_profile("cdc_properties")

ROUTES = Settings().routes
LAYOUTS = ["cdc.{company}.{table}", "sequin.changes.{database}.{schema}.{table}.{action}"]
TABLES = ["messages", "chats", "agents", "users"]
BAD_TOKEN = re.compile(r"[*>\s]")

# Subject tokens as NATS can deliver them (valid UTF-8, so no lone surrogates): routed tables, dots, wildcards,
# whitespace, control characters, unicode, empty tokens.
token = st.one_of(
    st.sampled_from(["cdc", "acme", "sequin", "changes", "chatdb", "public", "insert", *TABLES, "*", ">", "", " "]),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    st.text(st.sampled_from("ab.*> \t\x00\x7fé€😀"), max_size=6),
)
subjects = st.one_of(
    st.lists(token, min_size=1, max_size=7).map(".".join),
    st.builds(lambda c, t: f"cdc.{c}.{t}", token, st.sampled_from(TABLES)),
    st.builds(lambda t, a: f"sequin.changes.chatdb.public.{t}.{a}", st.sampled_from(TABLES), token),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.sampled_from(["acme", "agent-1", "chat-1", "msg-1", "a.b", "*", ">", "a b", "\x00", "é" * 130, "x" * 257]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
id_values = st.one_of(scalars, st.lists(scalars, max_size=2), st.dictionaries(st.text(max_size=3), scalars, max_size=2))
ID_KEYS = ["company_id", "agent_id", "chat_id", "message_id"]
records = st.one_of(
    st.fixed_dictionaries({}, optional={k: id_values for k in ID_KEYS}).flatmap(
        lambda ids: st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(lambda extra: {**extra, **ids})
    ),
    json_values,
)
metadata = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "table_name": st.one_of(st.sampled_from(TABLES), scalars),
            "commit_lsn": st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), scalars),
            "commit_idx": st.one_of(st.integers(min_value=-5, max_value=10), scalars),
            "commit_timestamp": st.one_of(
                st.sampled_from(["2026-11-27T04:00:00.123456Z", "0001-01-01T00:00:00", "9999-12-31T23:59:59-14:00"]),
                scalars,
            ),
            "database_name": scalars,
        },
    ),
    json_values,
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "record": records,
        "metadata": metadata,
        "action": st.one_of(st.sampled_from(["insert", "update", "delete", "read", "upsert", "INSERT"]), scalars),
        "changes": json_values,
    },
)
sequin_bodies = st.one_of(documents, json_values).map(lambda d: json.dumps(d).encode())
bodies = st.one_of(st.binary(max_size=300), sequin_bodies)

PARSER = simdjson.Parser()
BUILDERS = {layout: EventBuilder(SubjectLayout(layout), ROUTES, 4096) for layout in LAYOUTS}


def _check_one(outcome: Any) -> None:
    assert isinstance(outcome, (Skip, Publish, DeadLetter)), outcome
    if isinstance(outcome, Publish):
        tokens = outcome.subject.split(".")
        assert all(t and not BAD_TOKEN.search(t) for t in tokens), outcome.subject
        assert json.loads(outcome.payload)["event_id"] == outcome.event_id


@settings(PROFILE, max_examples=300)
@given(subject=subjects, data=st.binary(max_size=400), layout=st.sampled_from(LAYOUTS))
def test_any_bytes_on_any_subject_give_one_outcome(subject: str, data: bytes, layout: str) -> None:
    _check_one(BUILDERS[layout].plan(subject, data, PARSER))


@settings(PROFILE, max_examples=400)
@given(subject=subjects, doc=documents, layout=st.sampled_from(LAYOUTS))
def test_any_sequin_shaped_document_gives_one_outcome(subject: str, doc: dict[str, Any], layout: str) -> None:
    _check_one(BUILDERS[layout].plan(subject, json.dumps(doc).encode(), PARSER))


@settings(PROFILE, max_examples=300)
@given(table=st.sampled_from(TABLES), company=token, doc=documents)
def test_routed_subject_with_any_document_gives_one_outcome(table: str, company: str, doc: dict[str, Any]) -> None:
    # Aim at the routed subjects so that most examples get past the subject check into the body checks.
    _check_one(BUILDERS[LAYOUTS[0]].plan(f"cdc.{company}.{table}", json.dumps(doc).encode(), PARSER))


@settings(PROFILE, max_examples=60)
@given(batch=st.lists(st.tuples(subjects, bodies), min_size=1, max_size=20))
def test_batch_preparer_returns_one_outcome_per_message_in_order(batch: list[tuple[str, bytes]]) -> None:
    builder = BUILDERS[LAYOUTS[0]]
    preparer = BatchPreparer(builder, FakeDedupStore(), Metrics(CollectorRegistry()), max_deliver=3)
    messages = [FakeMessage(subject, data, seq=i + 1) for i, (subject, data) in enumerate(batch)]
    outcomes = preparer(messages)
    assert len(outcomes) == len(messages)
    for (subject, data), outcome in zip(batch, outcomes, strict=True):
        assert not isinstance(outcome, Retry), outcome  # a Retry here means plan raised (a bug)
        _check_one(outcome)
        # In order: the outcome at position i is the one for message i (the dedup store is empty: no Duplicate).
        assert outcome == builder.plan(subject, data, PARSER)
