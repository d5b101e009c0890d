"""Size limits of the package's code (issue 11): no function in ``cdc_service/`` with a cyclomatic complexity above
15 (radon's measure, the same as ``radon cc``) and no class longer than 250 lines. Past those a newcomer can no
longer change a unit safely; a function or class that needs more is split, or named below with the reason."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from radon.complexity import cc_visit
from radon.visitors import Class, Function

PACKAGE = Path(__file__).resolve().parents[2] / "cdc_service"
MAX_COMPLEXITY = 15
MAX_CLASS_LINES = 250

# Allowed to stay above the limit for good, each with its reason.
EXEMPT = {
    # The event builder's hot path (issue 11 names it as the one exception): it runs once per event on the worker
    # threads, one flat pass of validation checks, and each helper call split out of it would add a Python call per
    # event. Its branches are validation cases with their own tests (tests/unit/test_events.py and the hostile corpus).
    "cdc_service/core/events.py:EventBuilder._build",
}


def _sources() -> Iterator[tuple[str, str]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield f"cdc_service/{path.relative_to(PACKAGE).as_posix()}", path.read_text()


def _functions(blocks: Iterable[Function | Class]) -> Iterator[Function]:
    # cc_visit lists functions and methods side by side; closures hang below their function.
    for block in blocks:
        if isinstance(block, Function):
            yield block
            yield from _functions(block.closures)


def complexity_offenders() -> dict[str, int]:
    """``file:qualified.name`` -> cyclomatic complexity, for every function above the limit."""
    return {
        f"{name}:{function.fullname}": function.complexity
        for name, text in _sources()
        for function in _functions(cc_visit(text))
        if function.complexity > MAX_COMPLEXITY
    }


def length_offenders() -> dict[str, int]:
    """``file:Class`` -> lines from ``class`` to its last line, for every class above the limit."""
    found: dict[str, int] = {}
    for name, text in _sources():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_CLASS_LINES:
                    found[f"{name}:{node.name}"] = length
    return found


def test_no_function_is_too_complex() -> None:
    offenders = {k: v for k, v in complexity_offenders().items() if k not in EXEMPT}
    listed = ", ".join(f"{k} = {v}" for k, v in sorted(offenders.items()))
    assert not offenders, f"cyclomatic complexity above {MAX_COMPLEXITY} (split the function): {listed}"


def test_no_class_is_too_long() -> None:
    offenders = length_offenders()
    listed = ", ".join(f"{k} = {v} lines" for k, v in sorted(offenders.items()))
    assert not offenders, f"classes longer than {MAX_CLASS_LINES} lines (split the class): {listed}"


def test_exemptions_are_still_needed() -> None:
    """An exemption that no longer exceeds a limit is removed, so the lists cannot go stale."""
    offenders = complexity_offenders().keys() | length_offenders().keys()
    stale = sorted(EXEMPT - offenders)
    assert not stale, f"no longer above a limit; remove from EXEMPT: {', '.join(stale)}"


def test_the_measure_finds_an_offender() -> None:
    """The limits are measured, not assumed: a synthetic function with 16 branches is found."""
    branches = "".join(f"    if x == {i}:\n        return {i}\n" for i in range(MAX_COMPLEXITY))
    (function,) = _functions(cc_visit(f"def f(x):\n{branches}    return -1\n"))
    assert function.complexity == MAX_COMPLEXITY + 1
