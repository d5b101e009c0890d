"""requirements.txt is the lock of pyproject.toml's runtime dependencies (`make lock`): every package, transitive ones
included, pinned to one version with hashes, and no stale entry. Offline: the lock is compared with pyproject.toml and
with the metadata of the packages installed from it (`make venv` installs exactly the lock)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.lock import Pin, parse_lock

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.txt"
BUILD_LOCK = REPO / "requirements-build.txt"
PYPROJECT = REPO / "pyproject.toml"
STALE = "the lock is stale: run `make lock` and commit requirements.txt"


def top_level() -> list[Requirement]:
    return [Requirement(spec) for spec in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]


@pytest.fixture(scope="module")
def lock() -> dict[str, Pin]:
    return parse_lock(LOCK.read_text())


@pytest.mark.parametrize("path", [LOCK, BUILD_LOCK], ids=lambda p: p.name)
def test_every_line_is_an_exact_pin_with_hashes(path: Path) -> None:
    pins = parse_lock(path.read_text())
    assert pins
    for pin in pins.values():
        assert pin.hashes, f"{path.name}: {pin.name} has no --hash"


def test_every_top_level_dependency_is_locked_at_a_version_it_allows(lock: dict[str, Pin]) -> None:
    for requirement in top_level():
        pin = lock.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is in pyproject.toml but not in requirements.txt: {STALE}"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{pin.name}=={pin.version} does not satisfy pyproject.toml's {requirement}: {STALE}"
        )


def test_the_lock_names_pyproject_as_the_source_of_exactly_its_dependencies(lock: dict[str, Pin]) -> None:
    """A dependency dropped from pyproject.toml must leave the lock too (unless something else still needs it)."""
    declared = {canonicalize_name(r.name) for r in top_level()}
    from_pyproject = {name for name, pin in lock.items() if any("pyproject.toml" in via for via in pin.via)}
    assert from_pyproject == declared, STALE
    orphans = [name for name, pin in lock.items() if not pin.via]
    assert not orphans, f"pinned for no reason: {orphans}: {STALE}"


def test_the_venv_holds_exactly_the_locked_versions(lock: dict[str, Pin]) -> None:
    """`make venv` installs the lock hash-checked, then the dev list; a dev package must not move a runtime pin."""
    for pin in lock.values():
        if not pin.applies():
            continue
        try:
            installed = Version(importlib.metadata.version(pin.name))
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{pin.name} is locked but not installed: run `make venv`")
        assert installed == pin.version, (
            f"{pin.name} {installed} is installed, the lock pins {pin.version}: run `make venv`, or if a dev "
            "dependency needs another version, move the pin with `make lock UPGRADE='--upgrade-package ...'`"
        )


def test_every_dependency_of_a_locked_package_is_locked(lock: dict[str, Pin]) -> None:
    """The transitive closure, checked against the installed packages' metadata (the same versions as the pins,
    see the test above), for this interpreter's markers."""
    for pin in lock.values():
        if not pin.applies():
            continue
        for spec in importlib.metadata.requires(pin.name) or []:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = lock.get(canonicalize_name(requirement.name))
            assert dependency is not None, f"{pin.name} needs {requirement}, which is not in the lock: {STALE}"
            assert dependency.applies(), f"{pin.name} needs {requirement}, locked only under {dependency.marker}"
            assert requirement.specifier.contains(dependency.version, prereleases=True), (
                f"{pin.name} needs {requirement}, the lock pins {dependency.version}: {STALE}"
            )


def test_the_parser_sees_continuations_markers_and_via_blocks() -> None:
    """The checks above are only as good as the parser: a table of the shapes uv and pip-compile write."""
    text = (
        "# header\n"
        "a-b==1.0 ; python_full_version < '3.11.3' \\\n"
        "    --hash=sha256:" + "0" * 64 + " \\\n"
        "    --hash=sha256:" + "1" * 64 + "\n"
        "    # via\n"
        "    #   c\n"
        "    #   cdc-service (pyproject.toml)\n"
        "C==2.0 --hash=sha256:" + "2" * 64 + "\n"
        "    # via cdc-service (pyproject.toml)\n"
    )
    pins = parse_lock(text)
    assert set(pins) == {"a-b", "c"}
    assert pins["a-b"].version == Version("1.0")
    assert str(pins["a-b"].marker) == 'python_full_version < "3.11.3"'
    assert len(pins["a-b"].hashes) == 2
    assert pins["a-b"].via == ["c", "cdc-service (pyproject.toml)"]
    assert pins["c"].via == ["cdc-service (pyproject.toml)"]
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock("d>=1.0\n")
