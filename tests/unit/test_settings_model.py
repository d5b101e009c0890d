"""The declarations in cdc_service/config.py are the one source of truth: every setting has its documentation, and
docs/settings.md, settings.toml, .secrets.toml and the Helm values schema agree with them."""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from cdc_service import config
from cdc_service.config import SECRET_KEYS, Declared, declared_settings
from tools.settings_reference import DOC, rewrite

ROOT = Path(__file__).resolve().parents[2]
DECLARED = list(declared_settings())


def test_every_field_is_declared_with_a_line_of_documentation() -> None:
    assert {d.key for d in DECLARED} == {
        f"{section}.{item.name}" for section, cls in config._SECTIONS.items() for item in fields(cls)
    }
    for d in DECLARED:
        assert d.rule.doc, f"{d.key}: declare it with setting(default, doc, ...)"
        assert "\n" not in d.rule.doc and d.rule.doc.endswith("."), d.key


def test_docs_reference_is_up_to_date() -> None:
    text = DOC.read_text()
    assert rewrite(text) == text, "docs/settings.md is out of date: run .venv/bin/python tools/settings_reference.py"


def test_settings_toml_lists_every_setting_and_secrets_toml_the_secrets() -> None:
    committed = tomllib.loads((ROOT / "settings.toml").read_text())
    secrets = tomllib.loads((ROOT / ".secrets.toml").read_text())
    in_settings = {f"{s}.{k}" for s, table in committed.items() if s != "routes" for k in table}
    in_secrets = {f"{s}.{k}" for s, table in secrets.items() for k in table}
    assert in_settings == {d.key for d in DECLARED} - SECRET_KEYS
    assert in_secrets == SECRET_KEYS
    assert all(value == "" for table in secrets.values() for value in table.values())


def _schema() -> dict[str, Any]:
    schema = json.loads((ROOT / "deploy" / "helm" / "cdc-service" / "values.schema.json").read_text())
    return {
        f"{section}.{key}": spec
        for part in ("settings", "secrets")
        for section, table in schema["properties"][part]["properties"].items()
        if section != "routes" and "properties" in table
        for key, spec in table["properties"].items()
    }


SCHEMA = _schema()
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@pytest.mark.parametrize("d", DECLARED, ids=[d.key for d in DECLARED])
def test_helm_values_schema_agrees(d: Declared) -> None:
    spec = SCHEMA[d.key]
    if d.kind is tuple:
        assert set(spec["type"]) == {"array", "string"}
    else:
        assert spec["type"] == JSON_TYPES[d.kind]
    if d.kind in (int, float) and not d.rule.allow:
        assert spec.get("exclusiveMinimum") == d.rule.gt
        assert spec.get("minimum") == d.rule.ge
        assert spec.get("maximum") == d.rule.le
    if d.rule.choices:
        assert spec["enum"] == list(d.rule.choices)
