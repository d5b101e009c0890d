"""The Prometheus alert rules shipped in the chart: valid for promtool, unit-tested on synthetic series
(tests/deploy/alerts_test.yaml), and annotated the way the operations guide expects."""

from __future__ import annotations

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
    } <= names


def test_every_rule_is_an_alert_with_severity_and_annotations() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names), "recording rules belong elsewhere"
    assert len(names) == len(set(names)), names
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        assert annotations["runbook"] == f"docs/operations.md#{name.lower()}", name


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
