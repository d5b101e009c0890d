"""A bad value's error names where the value came from: the settings file, the --config file or the CDC_* variable
that set it last. A default has no source to name."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdc_service.config import ConfigError, load
from tests.servers import run_cli


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


SIZE = "ingest.batch_size: must be greater than 0, got"
ENV_SIZE = "(set by CDC_INGEST__BATCH_SIZE)"
URL = "nats.url[0]: expected a nats/tls/ws/wss URL with a host, got 'http://x' (set by CDC_NATS__URL)"
ROUTE = "routes.messages.subject: subject template 'wa.{{nope}}' must contain {{company}} so tenants stay apart"
PARTITIONS = "ingest.partition_stream: must differ from ingest.stream (it is sourced from it)"
PARTITIONED = '[ingest]\nordering = "partitioned"\npartition_stream = "cdc_events_stream"\n'


@pytest.mark.parametrize(
    ("settings_toml", "config_toml", "environ", "message"),
    [
        ("[ingest]\nbatch_size = 0\n", None, {}, SIZE + " 0 (set in {settings})"),
        (None, "[ingest]\nbatch_size = 0\n", {}, SIZE + " 0 (set in {config})"),
        (None, None, {"CDC_INGEST__BATCH_SIZE": "-3"}, f"{SIZE} -3 {ENV_SIZE}"),
        # the source that set it last: a --config file over settings.toml, a variable over both
        ("[ingest]\nbatch_size = 5\n", "[ingest]\nbatch_size = -1\n", {}, SIZE + " -1 (set in {config})"),
        ("[ingest]\nbatch_size = -1\n", None, {"CDC_INGEST__BATCH_SIZE": "0"}, f"{SIZE} 0 {ENV_SIZE}"),
        # a list element, a route field and a rule across settings name the key's source too
        (None, None, {"CDC_NATS__URL": "http://x"}, URL),
        ('[routes.messages]\nsubject = "wa.{nope}"\n', None, {}, ROUTE + " (set in {settings})"),
        (None, PARTITIONED, {}, PARTITIONS + " (set in {config})"),
    ],
)
def test_a_bad_value_names_its_source(
    in_tmp: Path, settings_toml: str | None, config_toml: str | None, environ: dict[str, str], message: str
) -> None:
    settings, config = in_tmp / "settings.toml", in_tmp / "prod.toml"
    if settings_toml is not None:
        settings.write_text(settings_toml)
    if config_toml is not None:
        config.write_text(config_toml)
    with pytest.raises(ConfigError) as info:
        load([config] if config_toml is not None else [], environ)
    assert str(info.value) == message.format(settings=settings, config=config)


def test_a_key_left_at_its_default_names_no_source(in_tmp: Path) -> None:
    # The rule reports ingest.partition_stream, which is at its default: nothing to name, the line ends as before.
    environ = {"CDC_INGEST__ORDERING": "partitioned", "CDC_INGEST__STREAM": "cdc_events_partitioned"}
    with pytest.raises(ConfigError) as info:
        load([], environ)
    assert str(info.value) == PARTITIONS
    (in_tmp / "ok.toml").write_text("[ingest]\nbatch_size = 64\n")
    assert load([in_tmp / "ok.toml"], {}).settings.ingest.batch_size == 64


def test_the_console_names_the_file_in_its_one_line(tmp_path: Path) -> None:
    (tmp_path / "prod.toml").write_text("[ingest]\nbatch_wait_ms = -1\n")
    result = run_cli(tmp_path, "config", "--config", "prod.toml")
    assert result.returncode != 0
    assert "ingest.batch_wait_ms: must be at least 0, got -1.0 (set in " in result.stderr
    assert "prod.toml)" in result.stderr
