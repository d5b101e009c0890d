"""Where settings come from: the layering of every source pair (winner per key), CDC_SETTINGS_FILES and --config,
the command line from another directory, and environment variables that cannot be settings (Kubernetes service
links) next to misspelt ones that must still be refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdc_service.config import ConfigError, load
from tests.k8s import service_link_variables
from tests.servers import run_cli

REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------------------
# Layering: every pair of sources, the winner stated per key

SOURCES = ("defaults", "settings.toml", ".secrets.toml", "CDC_SETTINGS_FILES", "--config", "CDC_*")
DEF, SET, SEC, VAR, OPT, ENV = SOURCES
URL, NAME, PW = "nats.url", "nats.name", "nats.password"
DEFAULT = {URL: ["nats://127.0.0.1:4222"], NAME: "cdc_service", PW: ""}
TAGS = dict(zip(SOURCES, ("defaults", "settings", "secrets", "files-variable", "config-option", "env"), strict=True))


def _values(source: str) -> dict[str, Any]:
    """What a source sets when it takes part: its own value of each key."""
    tag = TAGS[source]
    return {URL: [f"nats://{tag}:4222"], NAME: f"name-{tag}", PW: f"pw-{tag}"}


# (earlier source, later source, the source whose value wins for each key). The earlier source sets nats.url and
# nats.name, the later one nats.url and nats.password, all in one section: a key set by both goes to the later
# source, a key set by one only keeps that source's value (sections merge key by key, none replaces another).
LAYERING: list[tuple[str, str, dict[str, str]]] = [
    (DEF, SET, {URL: SET, NAME: DEF, PW: SET}),
    (DEF, SEC, {URL: SEC, NAME: DEF, PW: SEC}),
    (DEF, VAR, {URL: VAR, NAME: DEF, PW: VAR}),
    (DEF, OPT, {URL: OPT, NAME: DEF, PW: OPT}),
    (DEF, ENV, {URL: ENV, NAME: DEF, PW: ENV}),
    (SET, SEC, {URL: SEC, NAME: SET, PW: SEC}),
    (SET, VAR, {URL: VAR, NAME: SET, PW: VAR}),
    (SET, OPT, {URL: OPT, NAME: SET, PW: OPT}),
    (SET, ENV, {URL: ENV, NAME: SET, PW: ENV}),
    (SEC, VAR, {URL: VAR, NAME: SEC, PW: VAR}),
    (SEC, OPT, {URL: OPT, NAME: SEC, PW: OPT}),
    (SEC, ENV, {URL: ENV, NAME: SEC, PW: ENV}),
    (VAR, OPT, {URL: OPT, NAME: VAR, PW: OPT}),
    (VAR, ENV, {URL: ENV, NAME: VAR, PW: ENV}),
    (OPT, ENV, {URL: ENV, NAME: OPT, PW: ENV}),
]


def test_the_table_covers_every_pair_of_sources() -> None:
    pairs = {(a, b) for a, b, _ in LAYERING}
    assert pairs == {(a, b) for i, a in enumerate(SOURCES) for b in SOURCES[i + 1 :]}


def _toml(values: dict[str, Any]) -> str:
    lines = ["[nats]"]
    for key, value in values.items():
        lines.append(f"{key.split('.')[1]} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _apply(source: str, values: dict[str, Any], directory: Path, environ: dict[str, str], config: list[str]) -> None:
    if source == "defaults":
        return
    if source in ("settings.toml", ".secrets.toml"):
        (directory / source).write_text(_toml(values))
    elif source == "CDC_SETTINGS_FILES":
        (directory / "mounted").mkdir(exist_ok=True)
        (directory / "mounted" / "from-variable.toml").write_text(_toml(values))
        environ["CDC_SETTINGS_FILES"] = str(directory / "mounted" / "from-variable.toml")
    elif source == "--config":
        (directory / "operator.toml").write_text(_toml(values))
        config.append(str(directory / "operator.toml"))
    else:
        for key, value in values.items():
            section, name = key.split(".")
            environ[f"CDC_{section.upper()}__{name.upper()}"] = ",".join(value) if isinstance(value, list) else value


def _effective(settings: Any, key: str) -> Any:
    section, name = key.split(".")
    value = getattr(getattr(settings, section), name)
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize(("earlier", "later", "winners"), LAYERING, ids=[f"{a}<{b}" for a, b, _ in LAYERING])
def test_layering(
    earlier: str, later: str, winners: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ: dict[str, str] = {}
    config: list[str] = []
    first = {k: v for k, v in _values(earlier).items() if k != PW}
    second = {k: v for k, v in _values(later).items() if k != NAME}
    _apply(earlier, first, tmp_path, environ, config)
    _apply(later, second, tmp_path, environ, config)
    settings = load(config, environ).settings
    for key, winner in winners.items():
        expected = DEFAULT[key] if winner == "defaults" else _values(winner)[key]
        assert _effective(settings, key) == expected, f"{key}: expected the value of {winner}"
    assert settings.http.port == 8080  # set by no source


def test_all_sources_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    environ: dict[str, str] = {}
    config: list[str] = []
    for source in SOURCES:
        _apply(source, {URL: _values(source)[URL]}, tmp_path, environ, config)
    _apply(SET, {URL: _values(SET)[URL], NAME: "kept"}, tmp_path, {}, [])
    settings = load(config, environ).settings
    assert settings.nats.url == ("nats://env:4222",)  # CDC_* wins
    assert settings.nats.name == "kept"


def test_files_are_layered_in_the_order_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, port, size in (("a", 7000, 3), ("b", 7001, None), ("c", 7002, None), ("d", None, 5)):
        lines = ["[http]", f"port = {port}"] if port else []
        lines += ["[workers]", f"pool_size = {size}"] if size else []
        (tmp_path / f"{name}.toml").write_text("\n".join(lines) + "\n")
    loaded = load(["c.toml", "d.toml"], {"CDC_SETTINGS_FILES": "a.toml, b.toml"})
    assert (loaded.settings.http.port, loaded.settings.workers.pool_size) == (7002, 5)
    assert [Path(f).name for f in loaded.files] == ["a.toml", "b.toml", "c.toml", "d.toml"]
    # the variable the chart sets today is read the same way
    assert load([], {"SETTINGS_FILES_FOR_DYNACONF": "b.toml,a.toml"}).settings.http.port == 7000


@pytest.mark.parametrize(
    ("config", "environ", "message"),
    [
        (["missing.toml"], {}, "--config: no such settings file: missing.toml"),
        ([], {"CDC_SETTINGS_FILES": "x.toml,missing.toml"}, "CDC_SETTINGS_FILES: no such settings file: missing.toml"),
        (["settings.py"], {}, "--config: settings.py: settings files are .toml"),
        (["unknown.toml"], {}, "tables: unknown settings section"),
    ],
)
def test_bad_settings_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: list[str], environ: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.toml").write_text("")
    (tmp_path / "settings.py").write_text("HTTP = {'port': 1}\n")
    (tmp_path / "unknown.toml").write_text("[tables]\nx = 1\n")
    with pytest.raises(ConfigError) as info:
        load(config, environ)
    assert str(info.value).startswith(message)


def test_notice_only_when_no_file_was_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    notice = load([], {}).no_file_notice(str(tmp_path))
    assert notice is not None and notice.startswith("no settings file found") and str(tmp_path) in notice
    (tmp_path / "other.toml").write_text("")
    assert load(["other.toml"], {}).no_file_notice(str(tmp_path)) is None


def test_a_table_of_routes_merges_across_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.toml").write_text('[routes.contacts]\npk = "contact_id"\nsubject = "wa.{company}.c"\n')
    (tmp_path / "more.toml").write_text(
        '[routes.contacts]\nsubject = "wa.{company}.contacts"\n[routes]\nchats = false\n'
    )
    routes = load(["more.toml"], {}).settings.routes
    assert set(routes) == {"messages", "agents", "contacts"}
    assert (routes["contacts"].pk, routes["contacts"].template) == ("contact_id", "wa.{company}.contacts")


def test_a_literal_prefix_layout_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.toml").write_text('[ingest]\nsubject_layout = "cdc.daisi_{company}.{table}"\n')
    info = load([], {}).settings.layout.parse("cdc.daisi_acme.messages")
    assert (getattr(info, "company", None), getattr(info, "table", None)) == ("acme", "messages")


# ---------------------------------------------------------------------------------------------------------------
# Variables that cannot be settings


SERVICE_LINKS = {
    **service_link_variables("cdc-cdc-service", [{"name": "metrics", "port": 8080}]),
    **service_link_variables("cdc-ingest", [{"port": 4222}, {"name": "mon", "port": 8222, "protocol": "UDP"}]),
    **service_link_variables("cdc--http", [{"name": "http-alt", "port": 80}]),  # '--' gives CDC__HTTP_...
    **service_link_variables("cdc-nats--x", [{"port": 4222, "protocol": "SCTP"}]),
}


def test_service_link_variables_have_the_kubernetes_shapes() -> None:
    assert SERVICE_LINKS["CDC_CDC_SERVICE_SERVICE_HOST"] == "10.96.0.10"
    assert SERVICE_LINKS["CDC_CDC_SERVICE_SERVICE_PORT_METRICS"] == "8080"
    assert SERVICE_LINKS["CDC_CDC_SERVICE_PORT"] == "tcp://10.96.0.10:8080"
    assert SERVICE_LINKS["CDC_CDC_SERVICE_PORT_8080_TCP_ADDR"] == "10.96.0.10"
    assert SERVICE_LINKS["CDC_INGEST_PORT_8222_UDP_PROTO"] == "udp"
    assert "CDC__HTTP_SERVICE_PORT_HTTP_ALT" in SERVICE_LINKS


def test_service_link_variables_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load([], {**SERVICE_LINKS, "CDC_HTTP__PORT": "9000"}).settings.http.port == 9000


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CDC_INGESTS__BATCH_SIZE", "10", "ingests: unknown settings section (CDC_INGESTS__BATCH_SIZE)"),
        ("CDC_HTTPS__PORT", "80", "https: unknown settings section"),
        ("CDC_INGEST__BATCHSIZE", "10", "ingest.batchsize: unknown setting"),
        ("CDC_NATS__URL__X", "nats://a", "nats.url.x: unknown setting"),
        ("CDC_ROUTES__CHATS", "yes", "routes.chats: set CDC_ROUTES__<TABLE>__PK or __SUBJECT"),
        ("CDC_ROUTES__CHATS__TOPIC", "x", "routes.chats.topic: set CDC_ROUTES__<TABLE>__PK"),
        ("CDC_INGEST__SERVICE_HOST", "10.0.0.1", "ingest.service_host: unknown setting"),
    ],
)
def test_misspelt_variables_are_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load([], {**SERVICE_LINKS, name: value})
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("name", ["CDC_SETTINGS", "CDC_NATS", "CDC_DEBUG", "CDC_NATS_URL"])
def test_variables_without_a_double_underscore_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load([], {name: "anything"}).settings == load([], {}).settings


# ---------------------------------------------------------------------------------------------------------------
# The command line, from another directory


def test_cli_config_option_before_and_after_the_command(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "a.toml").write_text('[nats]\nurl = "nats://10.1.2.3:4222"\n')
    (tmp_path / "etc" / "b.toml").write_text("[http]\nport = 9100\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_cli(elsewhere, "--config", "../etc/a.toml", "config", "--config", str(tmp_path / "etc" / "b.toml"))
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert (printed["nats"]["url"], printed["http"]["port"]) == (["nats://10.1.2.3:4222"], 9100)
    assert "no settings file found" not in result.stderr


def test_cli_settings_files_variable(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[http]\nport = 9200\n")
    result = run_cli(REPO / "docs", "config", CDC_SETTINGS_FILES=str(tmp_path / "a.toml"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["http"]["port"] == 9200


def test_cli_missing_config_file_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "config", "--config", "nope.toml")
    assert result.returncode == 2
    assert result.stderr == "cdc_service: invalid setting --config: no such settings file: nope.toml\n"


def test_cli_help_names_the_sources(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--help")
    assert result.returncode == 0
    for word in ("--config FILE", "--version", "CDC_SETTINGS_FILES", ".secrets.toml"):
        assert word in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("dlq", "list", "--config", "bad.toml"),
        ("dlq", "replay", "--config", "bad.toml"),
        ("dlq", "--config", "bad.toml", "list"),
        ("--config", "bad.toml", "dlq", "list", "--config", "ok.toml"),
    ],
)
def test_cli_dlq_takes_the_config_option_where_the_other_commands_do(tmp_path: Path, args: tuple[str, ...]) -> None:
    # The file is read wherever the option stands (its bad value stops the command before any connection).
    (tmp_path / "bad.toml").write_text("[ingest]\nbatch_size = 0\n")
    (tmp_path / "ok.toml").write_text("[http]\nport = 9300\n")
    result = run_cli(tmp_path, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("cdc_service: invalid setting ingest.batch_size:"), result.stderr
