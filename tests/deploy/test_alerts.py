"""The Prometheus alert rules shipped in the chart: valid for promtool, unit-tested on synthetic series
(tests/deploy/alerts_test.yaml), and annotated the way the operations guide expects."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.files import ALERTS, ALERTS_TEST, REPO, alert_rules

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; .ci/run installs it)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_fire_on_broken_series_only() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_issue_alerts_exist() -> None:
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "CdcConsumerLagHigh",
        "CdcConsumerDeadLetters",
        "CdcConsumerPublishErrors",
        "CdcConsumerNoAcks",
        "CdcConsumerRedisDegraded",
        "CdcConsumerNatsDisconnected",
        "CdcConsumerHandlerErrors",
        "CdcConsumerBacklogGrowing",
        "CdcConsumerTargetDown",
        "CdcConsumerDown",
    } <= names


def test_lag_alert_has_a_warning_and_a_critical_level_with_a_traffic_guard() -> None:
    lag = [rule for rule in alert_rules() if rule["alert"] == "CdcConsumerLagHigh"]
    assert sorted(rule["labels"]["severity"] for rule in lag) == ["critical", "warning"]
    for rule in lag:
        assert "rate(cdc_consumer_lag_seconds_count[2m])) >=" in rule["expr"], rule["expr"]


def test_some_alert_fires_without_any_series_of_the_service() -> None:
    """Every other rule needs the service's own series: when the service is gone, only `up` and absent() remain."""
    down = next(rule for rule in alert_rules() if rule["alert"] == "CdcConsumerDown")
    assert "absent(up{" in down["expr"] and "cdc_consumer_" not in down["expr"]


def test_every_rule_is_an_alert_with_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names), "recording rules belong elsewhere"
    # One rule per alert and severity (CdcConsumerLagHigh has a warning and a critical level).
    levels = [(rule.get("alert"), rule["labels"]["severity"]) for rule in rules]
    assert len(levels) == len(set(levels)), levels
    headings = set(re.findall(r"^### (\w+)$", (REPO / "docs" / "operations.md").read_text(), re.MULTILINE))
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        # The standard annotation name, relative to the repository (the chart can prefix it, see tests/chart).
        assert annotations["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert "runbook" not in annotations, name
        assert name in headings, f"docs/operations.md has no runbook section '### {name}'"


def test_every_alert_has_a_unit_test() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])}
    fired = {
        case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", []) if case["exp_alerts"]
    }
    silent = {
        case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", []) if not case["exp_alerts"]
    }
    names = {rule["alert"] for rule in alert_rules()}
    levels = {(rule["alert"], rule["labels"]["severity"]) for rule in alert_rules()}
    fired_levels = {
        (case["alertname"], alert["exp_labels"]["severity"])
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
        for alert in case["exp_alerts"]
    }
    assert levels <= fired_levels, f"alert levels never shown to fire: {sorted(levels - fired_levels)}"
    assert names <= tested, f"alerts without a promtool unit test: {sorted(names - tested)}"
    assert names <= fired, f"alerts never shown to fire: {sorted(names - fired)}"
    assert names <= silent, f"alerts never shown to stay silent: {sorted(names - silent)}"
    assert (ALERTS_TEST.parent / doc["rule_files"][0]).resolve() == ALERTS.resolve()


def test_rule_file_is_plain_prometheus_not_a_helm_template() -> None:
    """The chart includes the file verbatim: no Helm directives (only Prometheus' own $labels/$value templates)."""
    text = ALERTS.read_text()
    assert "{{ ." not in text
    assert "{{- " not in text
    assert "{{" not in text.replace("{{ $labels.", "").replace("{{ $value", "")
