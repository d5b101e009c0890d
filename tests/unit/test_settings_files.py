"""Settings files: string values arrive exactly as written (dynaconf's `@` markers are not applied, templates never
evaluated), through the loader and through `python -m cdc_service config --config FILE`; nothing but the named files
is read; an unknown key names the file (or the variable) it came from; CDC_SETTINGS_FILES and its older name
SETTINGS_FILES_FOR_DYNACONF cannot disagree; `config` shows the claims off in partitioned ordering.

Each test here failed on the loader before these fixes (dynaconf read the files): the markers turned the values
into other strings, other types, errors or the content of another file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cdc_service.config import ConfigError, IngestSettings, Settings, effective, load, settings_from_mapping
from tests.servers import run_cli

# ---------------------------------------------------------------------------------------------------------------
# Values exactly as written

HOSTNAME_FILE = "/etc/hostname"  # what `@read_file` would have read

# (dotted key, value as written). Each value starts with a marker dynaconf applied to strings read from files.
MARKERS: list[tuple[str, str]] = [
    ("nats.password", '@json {"a": 1}'),  # was a table
    ("nats.password", "@format {this.nats.user}x"),  # was "x" after the user: a template evaluated
    ("nats.password", "@format {env[HOME]}"),  # was the process's HOME
    ("nats.token", "@jinja {{ 7 * 7 }}"),  # was an ImportError without jinja2, 49 with it
    ("redis.password", f"@read_file {HOSTNAME_FILE}"),  # was that file's content
    ("redis.password", "@strip  padded "),  # was "padded"
    ("nats.user", "@int 5"),  # was 5, then "expected a string"
    ("nats.user", "@none"),  # was None
    ("nats.name", "@del"),  # was a Del object
    ("nats.name", "@upper abc"),  # was "ABC"
    ("nats.name", "@reset x"),
    ("nats.name", "@merge {}"),
    ("nats.name", "@empty"),
    ("nats.name", "@get nats.user"),
    ("dedup.key_prefix", "@json ["),  # was a JSON error
    ("dlq.subject_prefix", "@none"),  # a subject token
    ("routes.messages.pk", "@upper message_id"),  # was "MESSAGE_ID"
]


def _nested(key: str, value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {}
    *parents, name = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[name] = value
    return data


def _toml(data: dict[str, Any]) -> str:
    """TOML of nested tables of strings (a JSON string is a TOML basic string)."""
    lines: list[str] = []

    def table(prefix: str, node: dict[str, Any]) -> None:
        values = {k: v for k, v in node.items() if not isinstance(v, dict)}
        if values:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {json.dumps(v)}" for k, v in values.items())
        for k, v in node.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)

    table("", data)
    return "\n".join(lines) + "\n"


def _yaml(data: dict[str, Any], indent: str = "") -> str:
    """Block-style YAML with double-quoted scalars (JSON escapes are YAML escapes)."""
    out = ""
    for k, v in data.items():
        out += f"{indent}{k}:\n{_yaml(v, indent + '  ')}" if isinstance(v, dict) else f"{indent}{k}: {json.dumps(v)}\n"
    return out


WRITERS: dict[str, Callable[[dict[str, Any]], str]] = {".toml": _toml, ".yaml": _yaml, ".json": json.dumps}


def _value(settings: Any, key: str) -> Any:
    section, *rest = key.split(".")
    if section == "routes":
        return getattr(settings.routes[rest[0]], rest[1])
    return getattr(getattr(settings, section), rest[0])


def _marker_file(directory: Path, key: str, value: str, suffix: str) -> Path:
    data = _nested(key, value)
    if key.startswith("nats.password"):
        data["nats"]["user"] = "svc"  # what `@format {this.nats.user}` would have read
    path = directory / f"operator{suffix}"
    path.write_text(WRITERS[suffix](data))
    return path


@pytest.mark.parametrize("suffix", list(WRITERS))
@pytest.mark.parametrize(("key", "value"), MARKERS, ids=[f"{k}={v}" for k, v in MARKERS])
def test_marker_values_in_a_file_arrive_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, key: str, value: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _marker_file(tmp_path, key, value, suffix)
    assert _value(load([str(path)], {}).settings, key) == value


@pytest.mark.parametrize(("key", "value"), MARKERS, ids=[f"{k}={v}" for k, v in MARKERS])
def test_marker_values_in_settings_and_secrets_toml_arrive_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    """The files read from the working directory: a secret in .secrets.toml, anything else in settings.toml."""
    monkeypatch.chdir(tmp_path)
    name = ".secrets.toml" if key.endswith(("password", "token")) else "settings.toml"
    (tmp_path / name).write_text(_toml(_nested(key, value)))
    assert _value(load([], {}).settings, key) == value


# The `config` command prints secrets as ***: the values it shows are the others.
SHOWN = [(k, v) for k, v in MARKERS if not k.endswith(("password", "token"))] + [
    ("nats.name", "@format {env[HOME]}"),
    ("nats.name", "@jinja {{ 7 * 7 }}"),
    ("nats.user", f"@read_file {HOSTNAME_FILE}"),
]


def _printed(printed: dict[str, Any], key: str) -> Any:
    node: Any = printed
    for part in key.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize(("key", "value"), SHOWN, ids=[f"{k}={v}" for k, v in SHOWN])
def test_cli_config_prints_marker_values_verbatim(tmp_path: Path, suffix: str, key: str, value: str) -> None:
    path = _marker_file(tmp_path, key, value, suffix)
    result = run_cli(tmp_path, "config", "--config", path.name)
    assert result.returncode == 0, result.stderr
    assert _printed(json.loads(result.stdout), key) == value


def test_cli_secret_with_a_marker_is_taken_verbatim_and_masked(tmp_path: Path) -> None:
    (tmp_path / "secrets.toml").write_text('[nats]\npassword = "@json {\\"a\\": 1}"\n')
    result = run_cli(tmp_path, "config", "--config", "secrets.toml")
    assert result.returncode == 0, result.stderr  # was 2: "nats.password: expected a string, got a table"
    assert json.loads(result.stdout)["nats"]["password"] == "***"


def test_a_number_written_as_a_marker_string_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`"@int 9000"` is a string, not a cast: an integer setting refuses it (dynaconf made it 9000)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.toml").write_text('[http]\nport = "@int 9000"\n')
    with pytest.raises(
        ConfigError, match=r"^http\.port: expected an integer, got '@int 9000' \(set in .*settings\.toml\)$"
    ):
        load([], {})


# ---------------------------------------------------------------------------------------------------------------
# Only the named files, whatever dynaconf's own variables say


def _port_file(path: Path, port: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"[http]\nport = {port}\n")
    return path


@pytest.mark.parametrize(
    ("variable", "value", "name"),
    [
        ("INCLUDES_FOR_DYNACONF", "{other}", "plain"),
        ("SECRETS_FOR_DYNACONF", "{other}", "plain"),
        ("SETTINGS_FILE_FOR_DYNACONF", "{other}", "plain"),
        ("AUTO_CAST_FOR_DYNACONF", "true", "@upper x"),
    ],
)
def test_dynaconf_variables_add_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    other = _port_file(tmp_path / "elsewhere" / "other.toml", 9999)
    monkeypatch.setenv(variable, value.format(other=other))
    (tmp_path / "mine.yaml").write_text(f"http:\n  port: 7001\nnats:\n  name: {json.dumps(name)}\n")
    settings = load(["mine.yaml"], {}).settings
    assert (settings.http.port, settings.nats.name) == (7001, name)


def test_a_local_twin_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / "settings.toml", 7001)
    _port_file(tmp_path / "settings.local.toml", 7002)  # dynaconf read it after settings.toml, unlisted
    loaded = load([], {})
    assert (loaded.settings.http.port, [Path(f).name for f in loaded.files]) == (7001, ["settings.toml"])


@pytest.mark.parametrize("name", ["prod[1].toml", "[ab].toml"])
def test_a_file_name_with_glob_characters_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / name, 7003)  # dynaconf took the name for a pattern and read nothing
    assert load([name], {}).settings.http.port == 7003


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "[http]\nport = \n", "not a valid settings file: Invalid value (at line 2, column 8)"),
        ("bad.json", '{"http": {"port": }}', "not a valid settings file: Expecting value (at line 1, column 19)"),
        ("bad.yaml", "http: [1\nnats: 2\n", "not a valid settings file: ParserError (at line 2, column 5)"),
        ("list.json", "[1, 2]", "not a valid settings file: expected a table of sections, got a list"),
        ("text.yaml", "just text\n", "not a valid settings file: expected a table of sections, got a string"),
    ],
)
def test_a_file_that_does_not_parse_names_the_file_and_where(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, text: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        load([name], {})
    assert str(info.value) == f"{tmp_path / name}: {message}"


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latin1.toml").write_bytes('[nats]\nname = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load(["latin1.toml"], {})
    assert str(info.value) == f"{tmp_path / 'latin1.toml'}: not a valid settings file: not UTF-8 (byte 18)"


def test_an_empty_yaml_file_sets_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    assert load(["empty.yaml"], {}).settings == load([], {}).settings


# ---------------------------------------------------------------------------------------------------------------
# An unknown key names where it came from

UNKNOWN_IN_FILES: list[tuple[str, str]] = [
    ("[nats]\nurls = []\n", "nats.urls: unknown setting"),
    ("[ingests]\nbatch_size = 1\n", "ingests: unknown settings section"),
    ("top = 1\n", "top: unknown settings section"),
    ('[routes.contacts]\npk = "id"\ntopic = "x"\n', "routes.contacts.topic: unknown setting"),
    ("dynaconf_include = ['x.toml']\n", "dynaconf_include: unknown settings section"),
    ("[nats]\ndynaconf_merge = true\n", "nats.dynaconf_merge: unknown setting"),
]
FILE_SOURCES = ["settings.toml", ".secrets.toml", "CDC_SETTINGS_FILES", "SETTINGS_FILES_FOR_DYNACONF", "--config"]


@pytest.mark.parametrize("source", FILE_SOURCES)
@pytest.mark.parametrize(("text", "message"), UNKNOWN_IN_FILES, ids=[m.split(":")[0] for _, m in UNKNOWN_IN_FILES])
def test_an_unknown_key_in_a_file_names_the_key_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, text: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / "settings.toml", 7001)  # a valid file before the bad one
    path = tmp_path / (source if source.endswith(".toml") else "mounted/extra.toml")
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    config, environ = ([str(path)], {}) if source == "--config" else ([], {})
    if source.endswith("FILES") or source.endswith("DYNACONF"):
        environ[source] = str(path)
    with pytest.raises(ConfigError) as info:
        load(config, environ)
    assert str(info.value).startswith(f"{message} (in {path}); known: ")


def test_an_unknown_key_in_a_yaml_file_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("ingest:\n  batchsize: 10\n")
    with pytest.raises(ConfigError, match=rf"^ingest\.batchsize: unknown setting \(in {tmp_path / 'x.yaml'}\);"):
        load(["x.yaml"], {})


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("CDC_NATS__URLS", "nats.urls: unknown setting (CDC_NATS__URLS); known: "),
        ("CDC_INGESTS__BATCH_SIZE", "ingests: unknown settings section (CDC_INGESTS__BATCH_SIZE); known: "),
        ("CDC_ROUTES__CONTACTS__TOPIC", "routes.contacts.topic: set CDC_ROUTES__<TABLE>__PK or __SUBJECT"),
    ],
)
def test_an_unknown_variable_names_the_variable_not_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / "settings.toml", 7001)
    with pytest.raises(ConfigError) as info:
        load([], {name: "x"})
    assert str(info.value).startswith(message) and "settings.toml" not in str(info.value)


def test_cli_unknown_key_line_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "prod.toml").write_text("[http]\nprot = 80\n")
    result = run_cli(tmp_path, "config", "--config", "etc/prod.toml")
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"cdc_service: invalid setting http.prot: unknown setting (in {tmp_path / 'etc' / 'prod.toml'}); known: "
    )
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# CDC_SETTINGS_FILES and SETTINGS_FILES_FOR_DYNACONF

NEW, OLD = "CDC_SETTINGS_FILES", "SETTINGS_FILES_FOR_DYNACONF"


@pytest.mark.parametrize(
    ("environ", "files"),
    [
        ({NEW: "a.toml,b.toml"}, ["a.toml", "b.toml"]),
        ({OLD: "a.toml,b.toml"}, ["a.toml", "b.toml"]),
        ({NEW: "a.toml,b.toml", OLD: "a.toml,b.toml"}, ["a.toml", "b.toml"]),  # read once
        ({NEW: "a.toml, b.toml", OLD: "{tmp}/a.toml,./b.toml"}, ["a.toml", "b.toml"]),  # the same files
        ({NEW: "a.toml", OLD: ""}, ["a.toml"]),  # empty is unset
        ({NEW: " ", OLD: "b.toml"}, ["b.toml"]),
    ],
)
def test_the_files_variables_agree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], files: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / "a.toml", 7001)
    _port_file(tmp_path / "b.toml", 7002)
    loaded = load([], {k: v.format(tmp=tmp_path) for k, v in environ.items()})
    assert [Path(f).name for f in loaded.files] == files


@pytest.mark.parametrize(
    ("new", "old"),
    [
        ("a.toml", "b.toml"),
        ("a.toml,b.toml", "b.toml,a.toml"),
        ("a.toml", "a.toml,b.toml"),
        ("a.toml,b.toml", "a.toml"),
    ],
)
def test_the_files_variables_disagreeing_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new: str, old: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _port_file(tmp_path / "a.toml", 7001)
    _port_file(tmp_path / "b.toml", 7002)
    with pytest.raises(ConfigError) as info:
        load([], {NEW: new, OLD: old})
    assert str(info.value) == (
        f"{NEW}: names other settings files ({new.replace(',', ', ')}) than {OLD} ({old.replace(',', ', ')}), its "
        "older name: set only one of them, or both to the same list"
    )


def test_cli_files_variables_disagreeing_exits_2_with_one_line(tmp_path: Path) -> None:
    _port_file(tmp_path / "a.toml", 7001)
    _port_file(tmp_path / "b.toml", 7002)
    result = run_cli(tmp_path, "config", **{NEW: "a.toml", OLD: "b.toml"})
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"cdc_service: invalid setting {NEW}: names other settings files (a.toml) than {OLD}"
    )
    assert result.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------------
# The effective settings: partitioned ordering has no claims


@pytest.mark.parametrize(
    ("ingest", "dedup", "claim_ttl"),
    [
        ({}, {}, 8.0),
        ({"ordering": "replica"}, {"claim_ttl": 6}, 6.0),
        ({"ordering": "partitioned"}, {}, 0.0),
        ({"ordering": "partitioned"}, {"claim_ttl": 6}, 0.0),
        ({"ordering": "partitioned"}, {"claim_ttl": 0}, 0.0),
    ],
)
def test_partitioned_ordering_turns_the_claims_off(
    ingest: dict[str, Any], dedup: dict[str, Any], claim_ttl: float
) -> None:
    assert settings_from_mapping({"ingest": ingest, "dedup": dedup}).dedup.claim_ttl == claim_ttl


def test_partitioned_ordering_still_checks_the_claim_ttl_as_written() -> None:
    """The value is unused in that mode, but the rule across settings is the same in both (it was before too)."""
    with pytest.raises(ConfigError, match=r"^dedup\.claim_ttl:"):
        settings_from_mapping({"ingest": {"ordering": "partitioned", "ack_wait": 5}})


def test_cli_config_shows_the_claims_off_in_partitioned_ordering(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text('[ingest]\nordering = "partitioned"\n[dedup]\nclaim_ttl = 6.0\n')
    result = run_cli(tmp_path, "config", "--config", "p.toml")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dedup"]["claim_ttl"] == 0


def test_effective_applies_to_settings_built_in_code() -> None:
    """The Service applies it too: settings built without the loader (tests, tools) run with the claims off."""
    built = Settings(ingest=IngestSettings(ordering="partitioned"))
    assert built.dedup.claim_ttl == 8.0
    assert effective(built).dedup.claim_ttl == 0.0
    assert effective(effective(built)) == effective(built)
    assert effective(Settings()).dedup.claim_ttl == 8.0  # replica ordering keeps its claims
