"""Regression tests for the measured configuration defects: each failed on the loader before its fix.

1. ``.secrets.toml`` replaced whole sections of ``settings.toml``; 2. environment values were parsed as TOML, so
strings changed; 3. credentials leaked in output and error lines; 4. bad values were accepted; 5. the program depended
on its working directory (the installed console script is tested in tests/deploy/test_package.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdc_service.config import ConfigError, load_settings, mask_url, settings_from_mapping
from tests.servers import run_cli

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t"


def _write(directory: Path, settings: str, secrets: str | None = None) -> None:
    (directory / "settings.toml").write_text(settings)
    (directory / ".secrets.toml").write_text(secrets if secrets is not None else (REPO / ".secrets.toml").read_text())


# ---------------------------------------------------------------------------------------------------------------
# 1. sections merge key by key across files


@pytest.mark.parametrize(
    ("section", "text", "check"),
    [
        ("nats", 'url = "nats://10.1.2.3:4222"', lambda s: s.nats.url == ("nats://10.1.2.3:4222",)),
        ("nats", 'name = "edited"', lambda s: s.nats.name == "edited"),
        ("nats", 'user = "svc"', lambda s: s.nats.user == "svc"),
        ("redis", 'url = "redis://10.1.2.3:6379/2"', lambda s: s.redis.url == "redis://10.1.2.3:6379/2"),
        ("redis", "socket_timeout = 2.5", lambda s: s.redis.socket_timeout == 2.5),
    ],
)
def test_secrets_file_does_not_replace_settings_sections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, text: str, check: Any
) -> None:
    _write(tmp_path, f"[{section}]\n{text}\n")
    monkeypatch.chdir(tmp_path)
    assert check(load_settings())


def test_secrets_file_does_not_hide_an_invalid_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "[nats]\npending_size_mb = -64\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^nats\.pending_size_mb:"):
        load_settings()


def test_a_secret_and_a_setting_of_one_section_both_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, '[redis]\nurl = "redis://r:6379/1"\n', '[redis]\npassword = "pw"\n')
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.redis.url, settings.redis.password) == ("redis://r:6379/1", "pw")


# ---------------------------------------------------------------------------------------------------------------
# 2. string settings arrive exactly as written in the environment

VERBATIM = ["0x1F", "1_000", "+12", "0o17", "0b11", "1e3", "true", "[1, 2]", '"quoted"', "@json x", "'single'", "inf"]


@pytest.mark.parametrize("value", VERBATIM)
@pytest.mark.parametrize("variable", ["CDC_NATS__PASSWORD", "CDC_NATS__TOKEN", "CDC_REDIS__PASSWORD", "CDC_NATS__USER"])
def test_string_settings_from_the_environment_are_verbatim(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    section, key = variable.removeprefix("CDC_").lower().split("__")
    assert getattr(getattr(load_settings(), section), key) == value


@pytest.mark.parametrize(
    ("variable", "value", "check"),
    [
        ("CDC_NATS__NAME", "0x1F", lambda s: s.nats.name == "0x1F"),
        ("CDC_DEDUP__KEY_PREFIX", "+12", lambda s: s.dedup.key_prefix == "+12"),
        ("CDC_INGEST__DURABLE", "1_000", lambda s: s.ingest.durable == "1_000"),
        ("CDC_ROUTES__MESSAGES__PK", "0o17", lambda s: s.routes["messages"].pk == "0o17"),
        # numbers are still parsed
        ("CDC_HTTP__PORT", "+9090", lambda s: s.http.port == 9090),
        ("CDC_INGEST__BATCH_SIZE", "1_000", lambda s: s.ingest.batch_size == 1000),
        ("CDC_PUBLISH__TIMEOUT", "2.5", lambda s: s.publish.timeout == 2.5),
    ],
)
def test_environment_values_keep_their_declared_type(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, value: str, check: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, value)
    assert check(load_settings())


# ---------------------------------------------------------------------------------------------------------------
# 3. credentials are masked wherever a URL or setting is echoed


@pytest.mark.parametrize(
    "url",
    [
        f"redis://h:6379/0?password={SECRET}",
        f"redis://h:6379/0?db=1&Password={SECRET}",
        f"rediss://h:6379/0?token={SECRET}&x=1",
        f"nats://h:4222?pass={SECRET}",
        f"redis://h:6379/0?client_secret={SECRET}",
        f"redis://user:{SECRET}@h:6379/0",
        f"nats://{SECRET}@h:4222",
        f"redis://:pa/{SECRET}@h:6379/0",
        f"redis://:pa#{SECRET}@h:6379/0",
        f"redis://:pa?{SECRET}@h:6379/0",
        f"redis://u:{SECRET}@h:notaport/0",
    ],
)
def test_mask_url_hides_every_credential(url: str) -> None:
    assert SECRET not in mask_url(url)


def test_config_output_masks_a_password_query_parameter(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config", CDC_REDIS__URL=f"redis://r:6379/0?password={SECRET}")
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert json.loads(result.stdout)["redis"]["url"] == "redis://r:6379/0?password=***"


@pytest.mark.parametrize(
    "raw",
    [
        {"redis": {"url": f"redis://:pa/{SECRET}@h:6379/0"}},
        {"redis": {"url": f"redis://:pa#{SECRET}@h:6379/0"}},
        {"redis": {"url": f"redis://:pa?{SECRET}@h:6379/0"}},
        {"redis": {"url": f"redis://u:{SECRET}@h:abc/0"}},
        {"redis": {"url": f"http://h:6379/0?password={SECRET}"}},
        {"redis": {"url": {"host": "h", "password": SECRET}}},
        {"redis": {"url": [f"redis://:{SECRET}@h"]}},
        {"nats": {"url": [f"nats://u:{SECRET}@h:4222", 5]}},
        {"nats": {"url": {"url": f"nats://u:{SECRET}@h:4222"}}},
        {"nats": {"url": f"nats://u:{SECRET}@h:abc"}},
        {"nats": {"password": [SECRET]}},
        {"nats": {"token": {"t": SECRET}}},
        {"redis": {"password": 12345, "url": f"redis://:{SECRET}@h:6379/x"}},
    ],
)
def test_error_lines_never_quote_a_credential(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(raw)
    assert SECRET not in str(info.value)
    assert "12345" not in str(info.value)


def test_cli_error_line_hides_the_password(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config", CDC_REDIS__URL=f"redis://:pa/{SECRET}@h:6379/0")
    assert result.returncode == 2
    assert SECRET not in result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and "redis.url" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 4. bad values are refused


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("redis.url", {"redis": {"url": "redis://h:6379/abc"}}),
        ("redis.url", {"redis": {"url": "redis://h:6379/0/1"}}),
        ("redis.url", {"redis": {"url": "redis://h:6379/0?db=x"}}),
        ("nats.max_outstanding_pings", {"nats": {"max_outstanding_pings": -1}}),
        ("nats.max_outstanding_pings", {"nats": {"max_outstanding_pings": 0}}),
        ("ingest.stream_replicas", {"ingest": {"stream_replicas": 7}}),
        ("publish.stream_replicas", {"publish": {"stream_replicas": 6}}),
    ],
)
def test_out_of_range_values_are_refused(key: str, raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}:"):
        settings_from_mapping(raw)


def test_a_missing_creds_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CDC_NATS__CREDS_FILE", str(tmp_path / "missing.creds"))
    with pytest.raises(ConfigError, match=r"^nats\.creds_file:"):
        load_settings()
    (tmp_path / "missing.creds").write_text("x")
    assert load_settings().nats.creds_file == str(tmp_path / "missing.creds")


def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path, "[nats\nurl = 1\n")
    result = run_cli(tmp_path, "config")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "settings.toml" in result.stderr and "line 1" in result.stderr


def test_a_password_in_settings_toml_is_warned_about(tmp_path: Path) -> None:
    _write(tmp_path, f'[nats]\npassword = "{SECRET}"\n')
    result = run_cli(tmp_path, "config")
    assert result.returncode == 0, result.stderr
    assert "nats.password" in result.stderr and "settings.toml" in result.stderr
    assert SECRET not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------
# 5. any working directory


def test_no_settings_file_is_reported(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config")
    assert result.returncode == 0, result.stderr
    assert "no settings file found" in result.stderr


def test_version(tmp_path: Path) -> None:
    from cdc_service import __version__

    result = run_cli(tmp_path, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cdc_service {__version__}"
