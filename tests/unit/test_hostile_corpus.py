"""The hostile corpus (tests/corpus/hostile.py) through EventBuilder.plan with a real pysimdjson parser."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest
import simdjson

from cdc_service.config import Settings
from cdc_service.core.events import EventBuilder
from cdc_service.core.outcomes import DeadLetter, Publish, Reason, Skip
from cdc_service.core.subjects import SubjectLayout
from tests.corpus.hostile import CASES, MAX_PAYLOAD_BYTES, PUBLISHED, SKIPPED, Case

ROUTES = Settings().routes


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


def test_corpus_is_large_and_covers_every_poison_reason() -> None:
    assert len(CASES) >= 35
    expected = Counter(case.expected for case in CASES)
    # max_deliveries and output_rejected come from the environment, not from the bytes of a message
    poison = {r.value for r in Reason} - {Reason.MAX_DELIVERIES.value, Reason.OUTPUT_REJECTED.value}
    assert poison <= set(expected), poison - set(expected)
    assert expected[SKIPPED] and expected[PUBLISHED]
    assert len({(c.subject, c.data, c.layout) for c in CASES}) == len(CASES), "cases must be distinct"


@pytest.mark.parametrize("case", _params())
def test_hostile_case_gets_its_documented_outcome(case: Case) -> None:
    builder = EventBuilder(SubjectLayout(case.layout), ROUTES, MAX_PAYLOAD_BYTES)
    outcome = builder.plan(case.subject, case.data, simdjson.Parser())
    if case.expected == SKIPPED:
        assert isinstance(outcome, Skip), outcome
    elif case.expected == PUBLISHED:
        assert isinstance(outcome, Publish), outcome
        event = orjson.loads(outcome.payload)
        assert event["event_id"] == outcome.event_id == case.event_id
        company = case.subject.split(".")[1]
        assert event["company_id"] == company
        assert event["row_data"]["company_id"] == company
        assert outcome.subject.split(".")[:2] == ["wa", company]
    else:
        assert isinstance(outcome, DeadLetter), outcome
        assert outcome.reason == case.expected, outcome
        assert outcome.detail and "\n" not in outcome.detail


def test_outcome_does_not_depend_on_parser_history() -> None:
    """One parser reused across the whole corpus (as a worker thread does) gives the same outcomes as fresh ones."""
    parser = simdjson.Parser()
    builders = {
        layout: EventBuilder(SubjectLayout(layout), ROUTES, MAX_PAYLOAD_BYTES) for layout in {c.layout for c in CASES}
    }
    for case in CASES:
        if case.xfail:
            continue
        shared = builders[case.layout].plan(case.subject, case.data, parser)
        fresh = builders[case.layout].plan(case.subject, case.data, simdjson.Parser())
        assert shared == fresh, case.name


CANARY = "s3cr3t-canary"


@pytest.mark.parametrize(
    "changes",
    [
        {"action": CANARY},
        {"action": [CANARY]},
        {"metadata__table_name": CANARY},
        {"record__company_id": CANARY},
        {"record__message_id": CANARY * 30},  # too long
        {"record__message_id": CANARY + "\x1b"},
        {"record__agent_id": CANARY + ".x"},
        {"record__chat_id": {"id": CANARY}},
        {"metadata__commit_lsn": CANARY},
        {"metadata__commit_idx": CANARY},
        {"metadata__database_name": CANARY * 30},
        {"metadata": CANARY},
        {"record": CANARY},
    ],
    ids=lambda c: next(iter(c)),
)
def test_dead_letter_details_never_quote_body_text(changes: dict[str, Any]) -> None:
    """The detail goes to the Cdc-Error-Detail header and the warning log: field path and kind of problem only."""
    from tests.corpus.hostile import raw

    builder = EventBuilder(SubjectLayout("cdc.{company}.{table}"), ROUTES, MAX_PAYLOAD_BYTES)
    outcome = builder.plan("cdc.acme.messages", raw(**changes), simdjson.Parser())
    assert isinstance(outcome, DeadLetter), outcome
    assert "s3cr3t" not in outcome.detail, outcome.detail
