"""The package as users install it: `pip install .` into a fresh venv, then the `cdc-service` console script from
another directory: --version, --help, `config --config FILE` (strings that start with a dynaconf marker taken as
written, an unknown key naming the file), and `run` logging its version and that no settings file was found.

To stay fast, the venv borrows the test venv's installed dependencies (a .pth file) instead of downloading them
(--no-deps). The build itself is the user's: pip's isolated build environment with the build backend of
pyproject.toml, which pip fetches (from its cache when it has one). The package is built from a copy of the sources,
so nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdc_service import __version__
from tests.servers import Process, free_port, running, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.package


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ directory of a fresh venv with cdc_service installed from a copy of the sources."""
    base = tmp_path_factory.mktemp("package")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "cdc_service", source / "cdc_service", ignore=shutil.ignore_patterns("__pycache__"))
    target = base / "venv"
    venv.EnvBuilder(with_pip=False).create(target)  # the test venv's pip installs into it (--python): no ensurepip
    python = target / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies come from the test venv, after the new venv's own site-packages in sys.path.
    Path(site, "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(source)],
        capture_output=True, text=True, timeout=300, check=False, cwd=base,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return target / "bin"


def _environ() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CDC_", "PYTHON")) and not k.endswith("_FOR_DYNACONF") and k != "VIRTUAL_ENV"
    }


def _run(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "cdc-service"), *args], cwd=cwd, env={**_environ(), **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


def test_it_runs_the_installed_copy(installed: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(installed / "python"), "-c", "import cdc_service; print(cdc_service.__file__)"],
        cwd=tmp_path, env=_environ(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    path = Path(result.stdout.strip())
    assert installed.parent in path.parents and ROOT not in path.parents


def test_version(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cdc_service {__version__}"
    metadata = subprocess.run(
        [str(installed / "python"), "-c", "import importlib.metadata as m; print(m.version('cdc_service'))"],
        cwd=tmp_path, env=_environ(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert metadata.stdout.strip() == __version__  # pyproject reads the same version


def test_help(installed: Path, tmp_path: Path) -> None:
    result = _run(installed, tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cdc-service")
    for word in ("run", "config", "dlq", "--config FILE", "--version"):
        assert word in result.stdout


def test_config_from_another_directory(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "settings.toml").write_text('[nats]\nurl = "nats://10.1.2.3:4222"\n')
    (tmp_path / "work").mkdir()
    result = _run(installed, tmp_path / "work", "config", "--config", "../path/to/settings.toml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nats"]["url"] == ["nats://10.1.2.3:4222"]
    bad = _run(installed, tmp_path / "work", "config", CDC_INGEST__BATCH_SIZE="0")
    assert bad.returncode == 2 and bad.stderr.startswith("cdc_service: invalid setting ingest.batch_size:")


# Strings in a settings file that start with one of dynaconf's markers: the installed copy takes them as written
# (dynaconf made the first a table, evaluated the templates, read the file and upper-cased the last).
MARKER_VALUES = {
    "nats.user": '@json {"a": 1}',
    "nats.name": "@format {env[HOME]}",
    "dedup.key_prefix": "@jinja {{ 7 * 7 }}:",
    "dedup.routing_key_prefix": "@read_file /etc/hostname",
    "dlq.subject_prefix": "@none",
    "routes.messages.pk": "@upper message_id",
}


@pytest.mark.parametrize(("key", "value"), MARKER_VALUES.items(), ids=list(MARKER_VALUES))
def test_config_takes_marker_strings_in_a_file_verbatim(installed: Path, tmp_path: Path, key: str, value: str) -> None:
    *tables, name = key.split(".")
    (tmp_path / "markers.toml").write_text(f"[{'.'.join(tables)}]\n{name} = {json.dumps(value)}\n")
    result = _run(installed, tmp_path, "config", "--config", "markers.toml")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    for part in key.split("."):
        shown = shown[part]
    assert shown == value


def test_an_unknown_key_names_the_file(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "prod.toml").write_text("[http]\nprot = 80\n")
    result = _run(installed, tmp_path, "config", "--config", "prod.toml")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"cdc_service: invalid setting http.prot: unknown setting (in {tmp_path / 'prod.toml'})"
    )


@pytest.fixture
def process(installed: Path, tmp_path: Path) -> Iterator[Process]:
    # No NATS answers on this port: the service keeps trying to connect, alive and not ready, until SIGTERM.
    env = {"CDC_NATS__URL": f"nats://127.0.0.1:{free_port()}", "CDC_HTTP__PORT": str(free_port())}
    env["CDC_HTTP__HOST"] = "127.0.0.1"
    service = Process(
        [str(installed / "cdc-service"), "run"], tmp_path / "service.log", {**_environ(), **env}, tmp_path
    )
    with running(service):
        yield service


def _records(process: Process) -> list[dict[str, object]]:
    """The JSON log records written so far (complete lines only)."""
    return [json.loads(line) for line in process.output().rpartition("\n")[0].splitlines()]


def test_run_logs_its_version_and_that_no_settings_file_was_found(process: Process) -> None:
    def started_or_exited() -> bool:
        return not process.alive() or any(r.get("message") == "starting" for r in _records(process))

    wait_for(started_or_exited, 30, what="the starting log line")
    records = _records(process)
    messages = [str(r["message"]) for r in records]
    assert any(m.startswith("no settings file found") for m in messages), messages
    starting = next(r for r in records if r["message"] == "starting")
    assert starting["version"] == __version__
    process.signal(signal.SIGTERM)
    assert process.wait(timeout=30) in (0, 1)
