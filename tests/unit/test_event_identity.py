"""The event identity (``Nats-Msg-Id`` and the Redis marker key) is injective: two different changes never share a
de-duplication key, whatever their parts contain; and it survives nats-py's header handling unchanged."""

from __future__ import annotations

import pytest
import simdjson
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc_service.config import Settings, settings_from_mapping
from cdc_service.core import events
from cdc_service.core.events import EventBuilder, event_identity, row_identity
from cdc_service.core.outcomes import DeadLetter, Publish, Reason
from cdc_service.core.subjects import SubjectLayout
from tests.sequin import body, encode

PROFILE = settings(derandomize=True, deadline=None, database=None, max_examples=400)

# Anything a part could hold, weighted towards the characters that could break a naive join or header.
text = st.one_of(
    st.text(max_size=8),
    st.text(st.sampled_from(":%. \t\r\n\x00\u00a0\u2028é😀\udcffa1"), max_size=6),
)
lsn = st.tuples(st.integers(0, 2**64 - 1), st.none() | st.integers(0, 2**32))
identity = st.tuples(text, text, text, text, lsn)


def _id(parts: tuple[str, str, str, str, tuple[int, int | None]]) -> str:
    database, company, table, pk, (commit_lsn, commit_idx) = parts
    lsn_text = str(commit_lsn) if commit_idx is None else f"{commit_lsn}.{commit_idx}"
    return event_identity(database, company, table, pk, lsn_text)


@PROFILE
@given(identity, identity)
def test_distinct_tuples_never_share_an_id_or_a_redis_key(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    if a != b:
        assert _id(a) != _id(b)
        assert "dedup:" + _id(a) != "dedup:" + _id(b)


@PROFILE
@given(identity)
def test_an_id_survives_nats_header_handling(parts: tuple) -> None:  # type: ignore[type-arg]
    event_id = _id(parts)
    assert event_id == event_id.strip()  # nats-py strips header values
    assert "\r" not in event_id and "\n" not in event_id
    event_id.encode("utf-8")  # headers are sent as UTF-8: no lone surrogates left


def test_the_issue_collisions_are_apart() -> None:
    builder = EventBuilder(SubjectLayout("cdc.{company}.{table}"), Settings().routes, 1 << 20)
    parser = simdjson.Parser()

    def event_id(subject: str, database: str = "chatdb", **record: str) -> str:
        doc = body("messages", lsn=40000, **record)
        doc["metadata"]["database_name"] = database
        outcome = builder.plan(subject, encode(doc), parser)
        assert isinstance(outcome, Publish), outcome
        return outcome.event_id

    ids = [
        event_id("cdc.acme.messages", message_id="k1"),
        event_id("cdc.acme.messages", message_id="k1 "),
        event_id("cdc.globex.messages", message_id="k1", company_id="globex"),
        event_id("cdc.acme.messages", database="archive", message_id="k1"),
    ]
    assert ids[0] == "40000:chatdb:acme:messages:k1"
    assert ids[1] == "40000:chatdb:acme:messages:k1%20"
    assert len(set(ids)) == len(ids)


_BUILDER = EventBuilder(
    SubjectLayout("cdc.{company}.{table}"),
    settings_from_mapping({"routes": {"messages": {"routing_cache": True}}}).routes,
    1 << 20,
)


@PROFILE
@given(st.text(max_size=6), st.text(max_size=6), st.sampled_from(["acme", "a%b", "a:b", "é"]))
def test_the_builder_gives_event_identity_and_row_identity(database: str, pk: str, company: str) -> None:
    # The builder remembers each <database>:<company>:<table> prefix; ids must be the functions' ids exactly.
    doc = body("messages", lsn=7, idx=2, message_id=pk, company_id=company)
    doc["metadata"]["database_name"] = database
    outcome = _BUILDER.plan(f"cdc.{company}.messages", encode(doc), simdjson.Parser())
    if not isinstance(outcome, Publish):  # an empty, long or unprintable pk is refused
        assert not pk or not pk.isprintable()
        return
    assert outcome.event_id == event_identity(database, company, "messages", pk, "7.2")
    assert outcome.routing is not None and outcome.routing[0] == row_identity(database, company, "messages", pk)


def test_the_builders_caches_stay_bounded_and_keep_their_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "_SUBJECT_CACHE_SIZE", 4)
    builder = EventBuilder(SubjectLayout("cdc.{company}.{table}"), Settings().routes, 1 << 20)
    parser = simdjson.Parser()
    for round_ in range(3):  # again after the caches were cleared
        for n in range(10):
            doc = body("messages", lsn=n + 1, chat_id=f"c{n}", message_id=f"m{n}")
            doc["metadata"]["database_name"] = f"db{n}"
            outcome = builder.plan("cdc.acme.messages", encode(doc), parser)
            assert isinstance(outcome, Publish) and outcome.event_id == f"{n + 1}:db{n}:acme:messages:m{n}", round_
            bad = builder.plan("cdc.acme.messages", encode(body("messages", chat_id=f"c {n}")), parser)
            assert isinstance(bad, DeadLetter) and bad.reason is Reason.INVALID_SUBJECT_TOKEN, round_
    assert len(builder._tokens) <= 4 and len(builder._id_prefixes) <= 4
