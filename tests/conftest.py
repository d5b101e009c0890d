from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come only from what a test sets: drop inherited CDC_* and dynaconf variables."""
    for key in list(os.environ):
        if key.startswith("CDC_") or key.endswith("_FOR_DYNACONF"):
            monkeypatch.delenv(key)
