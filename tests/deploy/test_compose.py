"""docker-compose.yml, checked without a Docker engine: the services and their settings, the monitoring profile, the
files it mounts, and that every CDC_* variable it sets is a setting the service reads."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from cdc_service.config import Settings, load_settings
from tests.deploy.files import ALERTS, COMPOSE, COMPOSE_DIR, DASHBOARD, REPO

PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _option(args: list[str], *names: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in an argument list."""
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports", [])}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts: container path -> host path (relative to the repo)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            out[target] = source
    return out


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert match and duration, duration
    return int(match.group(1) or 0) * 60 + int(match.group(2) or 0)


def test_core_services_have_no_profile_and_monitoring_has_one(services: dict[str, Any]) -> None:
    for name in ("nats", "redis", "cdc-service"):
        assert name in services
        assert not services[name].get("profiles"), f"{name} must start by default"
    for name in ("prometheus", "grafana"):
        assert name in services
        assert services[name].get("profiles") == ["monitoring"]


def test_nats_runs_jetstream_with_monitoring(services: dict[str, Any]) -> None:
    nats = services["nats"]
    assert nats["image"].startswith("nats:")
    args = _command(nats)
    assert "-js" in args or "--jetstream" in args
    monitor = _option(args, "-m", "--http_port")
    assert monitor == "8222"
    assert {4222, 8222} <= _published(nats)
    assert _option(args, "-sd", "--store_dir") in {v.split(":")[1] for v in nats.get("volumes", [])}
    assert "8222" in " ".join(nats["healthcheck"]["test"])


def test_redis_7_is_an_lru_cache_of_100mb(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert re.match(r"redis:7(\.|-|$)", redis["image"]), redis["image"]
    args = _command(redis)
    assert args[0] == "redis-server"
    assert _option(args, "--maxmemory") == "100mb"
    assert _option(args, "--maxmemory-policy") == "allkeys-lru"
    assert redis.get("healthcheck")


def test_service_is_built_here_and_runs_read_only(services: dict[str, Any]) -> None:
    svc = services["cdc-service"]
    build = svc["build"]
    assert build == "." or (isinstance(build, dict) and build.get("context", ".") == ".")
    assert (REPO / "Dockerfile").exists()
    assert svc["read_only"] is True
    assert svc.get("cap_drop") == ["ALL"]
    depends = svc["depends_on"]
    assert depends["nats"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])
    assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_service_points_at_the_other_services(services: dict[str, Any]) -> None:
    env = _environment(services["cdc-service"])
    nats = urlsplit(env["CDC_NATS__URL"])
    assert (nats.scheme, nats.hostname, nats.port) == ("nats", "nats", 4222)
    redis = urlsplit(env["CDC_REDIS__URL"])
    assert (redis.scheme, redis.hostname, redis.port) == ("redis", "redis", 6379)
    port = int(env.get("CDC_HTTP__PORT", "8080"))
    assert port in _published(services["cdc-service"])
    assert f":{port}/readyz" in " ".join(services["cdc-service"]["healthcheck"]["test"])


def test_every_cdc_variable_is_a_setting(services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each CDC_<SECTION>__<KEY> names a known section and key (an unknown section would be ignored silently), and
    the service loads them all, through its loader, into the values compose means."""
    sections = {f.name for f in fields(Settings)}
    known = {name: {f.name for f in fields(getattr(Settings(), name))} for name in sections if name != "routes"}
    cdc = {k: v for k, v in _environment(services["cdc-service"]).items() if k.startswith("CDC_")}
    assert cdc
    for name in cdc:
        parts = name[len("CDC_") :].lower().split("__")
        assert parts[0] in sections, f"{name}: no settings section {parts[0]!r}"
        if parts[0] == "routes":
            assert len(parts) == 3 and parts[2] in ("pk", "subject"), name
        else:
            assert len(parts) == 2 and parts[1] in known[parts[0]], f"{name}: no setting {'.'.join(parts)}"
    for key, value in cdc.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    settings = load_settings()
    assert settings.nats.url == (cdc["CDC_NATS__URL"],)
    assert settings.redis.url == cdc["CDC_REDIS__URL"]
    for name, value in cdc.items():
        section, key = name[len("CDC_") :].lower().split("__")
        loaded = getattr(getattr(settings, section), key)
        if isinstance(loaded, tuple):
            loaded = ",".join(loaded)
        same = str(loaded) == value or (isinstance(loaded, (int, float)) and float(loaded) == float(value))
        assert same, f"{name}={value!r} loaded as {loaded!r}"


def test_stop_grace_covers_the_drain(services: dict[str, Any]) -> None:
    svc = services["cdc-service"]
    grace = float(_environment(svc).get("CDC_SHUTDOWN__GRACE_SECONDS", Settings().shutdown.grace_seconds))
    assert _seconds(svc["stop_grace_period"]) > grace


def test_bind_mounts_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, source in _mounts(service).items():
            assert (REPO / source).exists(), f"{name}: {source} (for {target}) does not exist"


def test_prometheus_scrapes_the_service_and_loads_the_chart_rules(services: dict[str, Any]) -> None:
    mounts = _mounts(services["prometheus"])
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert (REPO / config_path).resolve() == (COMPOSE_DIR / "prometheus.yml").resolve()
    config = yaml.safe_load((COMPOSE_DIR / "prometheus.yml").read_text())
    rules_target = next(t for t, s in mounts.items() if (REPO / s).resolve() == ALERTS.resolve())
    assert any(Path(rules_target).match(pattern) for pattern in config["rule_files"])
    port = _environment(services["cdc-service"]).get("CDC_HTTP__PORT", "8080")
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert f"cdc-service:{port}" in targets


def test_grafana_provisions_the_chart_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    mounts = _mounts(grafana)
    provisioning = REPO / mounts["/etc/grafana/provisioning"]
    assert provisioning.resolve() == (COMPOSE_DIR / "grafana" / "provisioning").resolve()
    dashboard_target = next(t for t, s in mounts.items() if (REPO / s).resolve() == DASHBOARD.resolve())
    providers = yaml.safe_load((provisioning / "dashboards" / "cdc-service.yml").read_text())["providers"]
    assert str(Path(dashboard_target).parent) in [p["options"]["path"] for p in providers]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["type"] for d in datasources] == ["prometheus"]
    assert datasources[0]["isDefault"] is True
    assert urlsplit(datasources[0]["url"]).hostname == "prometheus"
    home = _environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home in (None, dashboard_target)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_prometheus_config() -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(COMPOSE_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
