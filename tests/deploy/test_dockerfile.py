"""The Dockerfile, read rather than built (no Docker engine here): multi-stage on python:3.11-slim-bookworm, wheels
built in the builder and installed offline, non-root, nothing written at run time, exec-form entrypoint."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest

from tests.deploy.files import DOCKERFILE, DOCKERIGNORE


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def test_two_stages_on_python_311_slim_bookworm() -> None:
    stages = _stages()
    assert len(stages) == 2
    assert [s[0][1] for s in stages] == [
        "python:3.11-slim-bookworm AS builder",
        "python:3.11-slim-bookworm AS runtime",
    ]


def test_builder_builds_wheels_and_runtime_installs_them_offline() -> None:
    builder, runtime = _stages()
    build = " ".join(args for op, args in builder if op == "RUN")
    assert re.search(r"pip wheel\b.*-r \S*requirements\.txt.*-w /wheels", build), build
    install = " ".join(args for op, args in runtime if op == "RUN")
    assert "--mount=type=bind,from=builder,source=/wheels" in install
    assert re.search(r"pip .*install .*--no-index .*--find-links=/wheels", install), install
    # The runtime never reaches an index and never carries the wheels.
    assert not any(op == "COPY" and "/wheels" in args for op, args in runtime)


def test_runs_as_non_root_uid_10001() -> None:
    _, runtime = _stages()
    users = [args for op, args in runtime if op == "USER"]
    assert users
    assert users[-1].split(":")[0] == "10001"
    assert "--uid 10001" in " ".join(args for op, args in runtime if op == "RUN")


def test_nothing_written_at_run_time() -> None:
    _, runtime = _stages()
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/nonexistent" in env
    runs = " ".join(args for op, args in runtime if op == "RUN")
    assert "compileall" in runs
    assert "/app/cdc_service" in runs


def test_exec_form_entrypoint_and_sigterm() -> None:
    instructions = _instructions()
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["python", "-m", "cdc_service"]
    assert not [args for op, args in instructions if op == "CMD"]
    assert [args for op, args in instructions if op == "STOPSIGNAL"] == ["SIGTERM"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics, simplified: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.replace("**/", "")):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("path", ["requirements.txt", "cdc_service", "settings.toml", ".secrets.toml"])
def test_build_context_holds_what_the_image_copies(path: str) -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied = " ".join(args for op, args in _instructions() if op == "COPY" and "--from" not in args)
    assert path in copied
    assert not _ignored(path, patterns)


def test_build_context_leaves_out_the_rest() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in (".git", ".venv", "tests", "benchmarks", "deploy", "docs", ".run", "cdc_service/__pycache__"):
        assert _ignored(path, patterns), path
