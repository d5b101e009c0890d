"""The Grafana dashboard shipped in the chart: valid JSON with the panels the issue names, queries promtool can
parse, and only metric names and labels that cdc_service/metrics.py defines (the running service is checked by
tests/integration/test_dashboard_metrics.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from cdc_service.metrics import Metrics
from tests.deploy.files import (
    alert_rules,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    expressions,
    grouping_labels,
    referenced_metrics,
    selector_labels,
)

PROMTOOL = shutil.which("promtool")


def _defined() -> dict[str, tuple[str, set[str]]]:
    """Every sample name the service can export -> (type, label names), from a fresh registry."""
    metrics = Metrics(CollectorRegistry())
    names: dict[str, tuple[str, set[str]]] = {}
    for collector in vars(metrics).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        (family,) = collector.describe()
        labels = set(collector._labelnames)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count", ""]}.get(family.type, [""])
        for suffix in suffixes:
            names[family.name + suffix] = (family.type, labels | ({"le"} if suffix == "_bucket" else set()))
    return names


def test_the_issue_panels_are_there() -> None:
    exprs = "\n".join(dashboard_exprs())
    wanted = {
        "throughput by table and result": r"sum by \(table, result\) \(rate\(cdc_consumer_events_total",
        "lag p95": r"histogram_quantile\(0\.95, sum by \(le\) \(rate\(cdc_consumer_lag_seconds_bucket",
        "processing p95": r"histogram_quantile\(0\.95, sum by \(table, le\) \(rate\(cdc_consumer_processing_seconds_b",
        "publish errors": r"rate\(cdc_consumer_publish_errors_total",
        "dedup hit ratio": r'cdc_consumer_dedup_lookups_total\{[^}]*result="hit"\}.*\) / ',
        "dead-letter rate": r"rate\(cdc_consumer_dead_letters_total",
        "in-flight": r"cdc_consumer_inflight_messages",
        "pool queue depth": r"cdc_consumer_pool_queue_depth",
        "backlog": r"max by \(job\) \(cdc_consumer_backlog_messages\{",
        "handler errors": r"sum by \(exception_type\) \(rate\(cdc_consumer_handler_errors_total\{",
        "NATS reconnects": r"increase\(cdc_consumer_nats_reconnects_total\{",
        "consumer re-creations": r"increase\(cdc_consumer_consumer_recreated_total\{",
        "partitions owned": r"sum by \(instance\) \(cdc_consumer_partitions_owned\{",
        "partition takeovers": r"increase\(cdc_consumer_partition_takeovers_total\{",
    }
    missing = [what for what, pattern in wanted.items() if not re.search(pattern, exprs)]
    assert not missing, missing


def test_dashboard_structure() -> None:
    doc = dashboard()
    assert doc["uid"] == "cdc-service"
    assert doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        # One data source for all: the variable, so the JSON works in any Grafana.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        assert panel.get("description"), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            # Every query follows the variables, so one Prometheus can hold several deployments.
            for selector in re.findall(r"cdc_[a-z_]+\{([^}]*)\}", target["expr"]):
                assert 'job=~"$job"' in selector, target["expr"]
                assert 'instance=~"$instance"' in selector, target["expr"]
            assert "[$__rate_interval]" in target["expr"] or "rate(" not in target["expr"], target["expr"]


def test_every_metric_and_label_used_is_defined_by_the_service() -> None:
    defined = _defined()
    unknown = {name: sorted(where) for name, where in referenced_metrics().items() if name not in defined}
    assert not unknown, f"not defined in cdc_service/metrics.py: {unknown}"
    for name, labels in selector_labels().items():
        assert labels <= defined[name][1], f"{name} has no label(s) {sorted(labels - defined[name][1])}"
    for expr in expressions():
        metrics, grouping = grouping_labels(expr)
        available = set().union(*(defined[m][1] for m in metrics))
        assert grouping <= available, f"grouping by {sorted(grouping - available)} in {expr}"
    # And the rules really use the alerts' metrics (the regex is not vacuous).
    assert "cdc_consumer_last_ack_timestamp_seconds" in referenced_metrics()
    assert "cdc_consumer_lag_seconds_bucket" in referenced_metrics()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no query checker of its own: wrap each query, with Grafana's variables filled in, as a
    recording rule and let `promtool check rules` parse it."""
    filled = [
        expr.replace("$__rate_interval", "1m")
        .replace("$namespace", ".*")
        .replace("$job", ".*")
        .replace("$instance", ".*")
        for expr in dashboard_exprs()
    ]
    assert all("$" not in expr for expr in filled), [e for e in filled if "$" in e]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": e} for i, e in enumerate(filled)]}]}
    path = tmp_path / "dashboard_queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_and_dashboard_share_the_lag_thresholds() -> None:
    thresholds = set()
    for rule in alert_rules():
        if rule["alert"] == "CdcConsumerLagHigh":
            match = re.search(r"cdc_consumer_lag_seconds_bucket\[2m\]\)\)\)\s*>\s*([0-9.]+)", rule["expr"])
            assert match, rule["expr"]
            thresholds.add(float(match.group(1)))
    assert len(thresholds) == 2  # warning and critical
    for title in ("Lag (", "Lag p95"):
        panel = next(p for p in dashboard_panels() if p["title"].startswith(title))
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert thresholds <= {s["value"] for s in steps}, title


def test_backlog_panel_marks_the_alerts_minimum() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "CdcConsumerBacklogGrowing")
    match = re.search(r"max by \(namespace, job\) \(cdc_consumer_backlog_messages\) > ([0-9]+)", rule["expr"])
    assert match, rule["expr"]
    panel = next(p for p in dashboard_panels() if p["title"] == "Consumer backlog")
    assert float(match.group(1)) in [s["value"] for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]]
