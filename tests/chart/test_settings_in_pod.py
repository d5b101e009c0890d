"""The Helm path end to end: render the chart, write the rendered ConfigMap and Secret files where the pod mounts
them, give the process the container's environment plus the service-link variables Kubernetes adds for the
rendered Service (and for other `cdc-*` Services of the namespace), and run `python -m cdc_service config` from a
copy of the image's working directory, the way the pod starts. The effective values must be those of the values.

helm as in tests/chart/test_chart.py (skipped without it, an error under CI).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from cdc_service import config
from tests.chart.test_chart import CHART, CONFIG_DIR, HELM, ROOT, container, helm, only
from tests.k8s import service_link_variables
from tests.servers import run_cli

if HELM is None:
    pytestmark = pytest.mark.skip(reason="helm not found: run tools/install_helm.sh (make test does) or set HELM")

SETTINGS_TOML = """\
[nats]
url = ["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]
user = "cdc"

[redis]
url = "redis://redis-master:6379/2"
"""
PASSWORD = "0x1F/#?pw"  # would change if parsed as TOML, breaks a URL unless encoded
VALUES = {"settingsToml": SETTINGS_TOML, "secrets": {"nats": {"password": PASSWORD}, "redis": {"password": "r3d"}}}
# Release names whose Services start with the settings prefix: cdc -> cdc-cdc-service -> CDC_CDC_SERVICE_*.
RELEASES = ["cdc", "cdc-prod", "cdc-service", "orders"]


def _render(release: str, tmp: Path) -> list[dict[str, Any]]:
    values = tmp / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    result = helm("template", release, str(CHART), "--namespace", "cdc", "-f", str(values))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _pod(release: str, tmp: Path) -> tuple[Path, dict[str, str]]:
    """The pod's working directory and environment, with its /etc under ``tmp``."""
    docs = _render(release, tmp)
    etc = tmp / "etc" / "cdc-service"
    etc.mkdir(parents=True)
    (etc / "settings.toml").write_text(only(docs, "ConfigMap")["data"]["settings.toml"])
    (etc / ".secrets.toml").write_text(only(docs, "Secret")["stringData"][".secrets.toml"])
    app = tmp / "app"  # the image's WORKDIR holds the repository's settings.toml and .secrets.toml (Dockerfile)
    app.mkdir()
    for name in config.DEFAULT_FILES:
        (app / name).write_text((ROOT / name).read_text())
    environ = {e["name"]: e["value"].replace(CONFIG_DIR, str(etc)) for e in container(docs)["env"] if "value" in e}
    service = only(docs, "Service")
    environ |= service_link_variables(service["metadata"]["name"], service["spec"]["ports"])
    # other Services of the namespace whose names start with the prefix
    environ |= service_link_variables("cdc-redis", [{"name": "redis", "port": 6379}], "10.96.0.11")
    environ |= service_link_variables("cdc", [{"port": 4222}], "10.96.0.12")
    return app, environ


@pytest.mark.parametrize("release", RELEASES)
def test_the_pod_sees_the_values(release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, environ = _pod(release, tmp_path)
    assert any(name.startswith("CDC_") and name.endswith("_SERVICE_HOST") for name in environ)

    result = run_cli(app, "config", **environ)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["nats"]["url"] == ["nats://nats-0.nats:4222", "nats://nats-1.nats:4222"]
    assert printed["nats"]["user"] == "cdc"
    assert printed["redis"]["url"] == "redis://redis-master:6379/2"
    assert printed["nats"]["password"] == printed["redis"]["password"] == "***"
    assert PASSWORD not in result.stdout + result.stderr
    assert printed["ingest"]["batch_size"] == 256  # from the image's settings.toml, not replaced by the mounted one

    # The secrets themselves, exactly as given (the same loader, in process).
    monkeypatch.chdir(app)
    settings = config.load([], environ).settings
    assert (settings.nats.password, settings.redis.password) == (PASSWORD, "r3d")
    assert settings.nats.url == ("nats://nats-0.nats:4222", "nats://nats-1.nats:4222")


# The chart names its files in SETTINGS_FILES_FOR_DYNACONF only: images built before CDC_SETTINGS_FILES existed (also
# version 0.1.0, the chart's appVersion) read only that variable and stop on CDC_SETTINGS_FILES ("settings_files:
# unknown settings section"). A CDC_SETTINGS_FILES that reaches the pod anyway (extraEnvFrom, a patched manifest)
# must either name the same files or stop the service with one line naming both variables.
SAME, OTHER = "same", "other"


@pytest.mark.parametrize("second", [SAME, OTHER])
def test_the_pod_with_both_files_variables(second: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, environ = _pod("cdc", tmp_path)
    chart_files = environ[config.LEGACY_FILES_VARIABLE]
    other = tmp_path / "etc" / "cdc-service" / "other.toml"
    other.write_text("[http]\nport = 9000\n")
    environ[config.FILES_VARIABLE] = chart_files if second == SAME else f"{chart_files},{other}"

    result = run_cli(app, "config", **environ)
    if second == OTHER:
        assert result.returncode == 2
        assert result.stderr.startswith(
            f"cdc_service: invalid setting {config.FILES_VARIABLE}: names other settings files"
        ), result.stderr
        assert config.LEGACY_FILES_VARIABLE in result.stderr and result.stderr.count("\n") == 1
        return
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["nats"]["user"] == "cdc"
    monkeypatch.chdir(app)
    mounted = [str(Path(f)) for f in chart_files.split(",")]
    assert list(config.load([], environ).files) == [str(app / n) for n in config.DEFAULT_FILES] + mounted


@pytest.mark.parametrize("name", [config.FILES_VARIABLE, config.LEGACY_FILES_VARIABLE])
def test_extra_env_cannot_name_other_settings_files(name: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({**VALUES, "extraEnv": [{"name": name, "value": "/etc/other.toml"}]}))
    result = helm("template", "cdc", str(CHART), "--namespace", "cdc", "-f", str(values))
    assert result.returncode != 0
    assert (
        f"extraEnv {name}: the chart names the mounted settings files in SETTINGS_FILES_FOR_DYNACONF" in result.stderr
    )


def test_extra_settings_files_are_read_after_the_charts_own(tmp_path: Path) -> None:
    """`extraSettingsFiles`: a mounted file read after the chart's settings.toml (it wins there) and before the
    CDC_* variables of `settings` (they win over it), the way the pod reads them."""
    extra_dir = "/etc/cdc-extra"
    values = {
        **VALUES,
        "settings": {"ingest": {"batch_wait_ms": 4}},
        "extraSettingsFiles": [f"{extra_dir}/prod.toml"],
        "extraVolumes": [{"name": "extra", "configMap": {"name": "cdc-shared"}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": extra_dir, "readOnly": True}],
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    result = helm("template", "cdc", str(CHART), "--namespace", "cdc", "-f", str(tmp_path / "values.yaml"))
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    etc, extra = tmp_path / "etc", tmp_path / "extra"
    etc.mkdir()
    extra.mkdir()
    (etc / "settings.toml").write_text(
        only(docs, "ConfigMap")["data"]["settings.toml"] + "\n[ingest]\nbatch_size = 64\n"
    )
    (etc / ".secrets.toml").write_text(only(docs, "Secret")["stringData"][".secrets.toml"])
    (extra / "prod.toml").write_text('[ingest]\nbatch_size = 128\nbatch_wait_ms = 9.0\n[nats]\nname = "cdc-prod"\n')
    environ = {
        e["name"]: e["value"].replace(CONFIG_DIR, str(etc)).replace(extra_dir, str(extra))
        for e in container(docs)["env"]
        if "value" in e
    }
    assert environ["SETTINGS_FILES_FOR_DYNACONF"].endswith(f"/.secrets.toml,{extra}/prod.toml")
    app = tmp_path / "app"
    app.mkdir()
    result = run_cli(app, "config", **environ)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["ingest"]["batch_size"] == 128  # the extra file over the chart's settings.toml
    assert printed["nats"]["name"] == "cdc-prod"
    assert printed["ingest"]["batch_wait_ms"] == 4  # CDC_INGEST__BATCH_WAIT_MS over every file
    assert printed["nats"]["user"] == "cdc"  # the chart's file still counts where the extra one is silent

    (extra / "prod.toml").unlink()
    result = run_cli(app, "config", **environ)
    assert result.returncode != 0
    assert f"{extra}/prod.toml" in result.stderr  # a missing file stops start-up naming it
