"""Paths of the deployment files, and the metric names their PromQL uses (shared with
tests/integration/test_dashboard_metrics.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART_FILES = REPO / "deploy" / "helm" / "cdc-service" / "files"
DASHBOARD = CHART_FILES / "dashboard.json"
ALERTS = CHART_FILES / "alerts.yaml"
ALERTS_TEST = Path(__file__).resolve().parent / "alerts_test.yaml"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_DIR = REPO / "deploy" / "compose"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

# Every metric the service exports starts with `cdc_`; anything in the files that looks like one must be real, apart
# from the project's other names (package, streams, durable).
_METRIC = re.compile(r"\bcdc_[a-z0-9_]+\b")
_NOT_METRICS = frozenset({"cdc_service", "cdc_events_stream", "cdc_dlq_stream", "cdc_consumers"})
# `metric{label="value", ...}`: the label names a selector uses.
_SELECTOR = re.compile(r"\b(cdc_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels the scrape adds, not the service.
TARGET_LABELS = frozenset({"namespace", "job", "instance", "pod", "service", "container", "endpoint"})


def dashboard() -> dict[str, Any]:
    doc = json.loads(DASHBOARD.read_text())
    assert isinstance(doc, dict)
    return doc


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def alert_rules() -> list[dict[str, Any]]:
    import yaml

    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def referenced_texts() -> dict[str, str]:
    """The texts whose metric names must be exported: the whole dashboard (queries, variables, descriptions) and
    the whole rule file (expressions and annotations)."""
    return {"dashboard.json": DASHBOARD.read_text(), "alerts.yaml": ALERTS.read_text()}


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> the files that name it."""
    names: dict[str, set[str]] = {}
    for where, text in referenced_texts().items():
        for name in set(_METRIC.findall(text)) - _NOT_METRICS:
            names.setdefault(name, set()).add(where)
    return names


def selector_labels() -> dict[str, set[str]]:
    """Metric name -> label names used in its selectors, target labels left out."""
    labels: dict[str, set[str]] = {}
    for text in referenced_texts().values():
        # JSON escapes the quotes inside expressions; the label names are what matter here.
        for name, body in _SELECTOR.findall(text.replace('\\"', '"')):
            used = {label for label in _MATCHER.findall(body) if label not in TARGET_LABELS}
            labels.setdefault(name, set()).update(used)
    return labels


def base_name(sample: str) -> str:
    """``x_bucket`` / ``x_sum`` / ``x_count`` / ``x_created`` / ``x_total`` -> ``x`` (the family name)."""
    for suffix in ("_bucket", "_sum", "_count", "_created", "_total"):
        if sample.endswith(suffix):
            return sample[: -len(suffix)]
    return sample


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def expressions() -> list[str]:
    """Every PromQL expression: the dashboard's queries and the alert rules."""
    return dashboard_exprs() + [rule["expr"] for rule in alert_rules()]


def grouping_labels(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names in by/without/on/ignoring clauses) of one expression, target labels left out."""
    metrics = set(_METRIC.findall(expr)) - _NOT_METRICS
    labels = {label.strip() for group in _GROUPING.findall(expr) for label in group.split(",") if label.strip()}
    return metrics, labels - TARGET_LABELS
