"""The Dockerfile, read: multi-stage on python:3.11-slim-bookworm, the lock's wheels built hash-checked in the
builder and installed offline, build arguments confined to the builder, non-root, nothing written at run time,
exec-form entrypoint. `make image-test` (tools/image_test.py, run by .ci/run) builds and runs it."""

from __future__ import annotations

import fnmatch
import json
import re

import pytest
import yaml

from tests.deploy.files import COMPOSE, DOCKERFILE, DOCKERIGNORE, REPO
from tests.deploy.lock import parse_lock

BUILD_ARGS = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "EXTRA_CA_CERTS"}


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


def _global_and_stages() -> tuple[list[tuple[str, str]], list[list[tuple[str, str]]]]:
    """(instructions before the first FROM, the stages)."""
    preamble: list[tuple[str, str]] = []
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        (stages[-1] if stages else preamble).append(instruction)
    return preamble, stages


def _stages() -> list[list[tuple[str, str]]]:
    return _global_and_stages()[1]


def test_two_stages_on_python_311_slim_bookworm() -> None:
    preamble, stages = _global_and_stages()
    assert preamble == [("ARG", "PYTHON_IMAGE=python:3.11-slim-bookworm")]
    assert [s[0][1] for s in stages] == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE} AS runtime"]


def test_no_syntax_directive() -> None:
    """`# syntax=` makes every build fetch a frontend image from a registry first; Docker's built-in one suffices."""
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), re.M | re.I)


def test_builder_builds_the_locked_wheels_hash_checked() -> None:
    builder, _ = _stages()
    build = " ".join(args for op, args in builder if op == "RUN")
    wheel = re.search(r"pip wheel\b[^;&]*", build)
    assert wheel, build
    command = wheel.group(0)
    assert re.search(r"-r \S*/requirements\.txt\b", command) and "-w /wheels" in command, command
    assert "--require-hashes" in command
    # Binary wheels only, but for the named source-only packages, built with the locked backend, no isolation.
    assert "--only-binary=:all:" in command
    assert "--no-build-isolation" in command
    assert re.search(r"pip install --require-hashes\b[^;&]*-r \S*/requirements-build\.txt", build), build
    no_binary = re.search(r"--no-binary=(\S+)", command)
    assert no_binary, command
    locked = parse_lock((REPO / "requirements.txt").read_text())
    for name in no_binary.group(1).split(","):
        assert name in locked, f"--no-binary names {name}, which is not in the lock"


def test_runtime_installs_exactly_the_builder_wheels_offline() -> None:
    _, runtime = _stages()
    install = " ".join(args for op, args in runtime if op == "RUN")
    # Bound, not copied, onto a directory the base image has, so no empty mount point stays in the image.
    assert "--mount=type=bind,from=builder,source=/wheels,target=/mnt" in install
    assert re.search(r"pip .*install .*--no-index .*--no-deps /mnt/\*\.whl", install), install
    assert not any(op == "COPY" and ("/wheels" in args or "--from" in args) for op, args in runtime)


def test_build_arguments_stay_in_the_builder() -> None:
    builder, runtime = _stages()
    declared = {args.split("=", 1)[0] for op, args in builder if op == "ARG"}
    assert declared == BUILD_ARGS
    assert not [args for op, args in runtime if op == "ARG"]
    runtime_text = " ".join(args for _, args in runtime)
    assert not [name for name in (*BUILD_ARGS, "PIP_CERT") if name in runtime_text]


def test_the_runtime_stage_installs_no_packages() -> None:
    """No compiler or package manager step in the final image; anything native comes as a wheel."""
    _, runtime = _stages()
    runs = " ".join(args for op, args in runtime if op == "RUN")
    assert not re.search(r"\b(apt-get|apt|dpkg|gcc|build-essential)\b", runs), runs


def test_compose_passes_only_build_arguments_the_dockerfile_declares() -> None:
    build = yaml.safe_load(COMPOSE.read_text())["services"]["cdc-service"]["build"]
    assert set(build["args"]) == BUILD_ARGS | {"PYTHON_IMAGE"}


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


@pytest.mark.parametrize(
    "path", ["requirements.txt", "requirements-build.txt", "cdc_service", "settings.toml", ".secrets.toml"]
)
def test_build_context_holds_what_the_image_copies(path: str) -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    copied = " ".join(args for op, args in _instructions() if op == "COPY" and "--from" not in args)
    assert path in copied
    assert not _ignored(path, patterns)


def test_build_context_leaves_out_the_rest() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for path in (".git", ".venv", "tests", "benchmarks", "deploy", "docs", ".run", "cdc_service/__pycache__"):
        assert _ignored(path, patterns), path
