"""dynaconf reads each settings file (``config._read_file``), but nothing of dynaconf's own configuration comes from the
environment: every ``*_FOR_DYNACONF`` variable that could add a file, run code or change how a file is parsed, set to
a hostile value around ``python -m cdc_service config --config FILE``, leaves the output as it is without them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdc_service.config import load
from tests.servers import run_cli

# What each file holds: strings that start with dynaconf markers, keys with separators dynaconf could split, a
# [nats] table that an environment named "nats" would take for an environment, and a route.
VALUES = {
    "nats": {"name": "@upper abc", "user": "@format {env[HOME]}"},
    "dedup": {"key_prefix": "@read_file /etc/hostname"},
    "http": {"port": 7001},
    "routes": {"messages": {"pk": "message_id", "subject": "wa.{company}.messages"}},
}
TEXT = {
    ".toml": (
        '[nats]\nname = "@upper abc"\nuser = "@format {env[HOME]}"\n[dedup]\nkey_prefix = "@read_file /etc/hostname"\n'
        '[http]\nport = 7001\n[routes.messages]\npk = "message_id"\nsubject = "wa.{company}.messages"\n'
    ),
    ".yaml": (
        'nats:\n  name: "@upper abc"\n  user: "@format {env[HOME]}"\ndedup:\n  key_prefix: "@read_file /etc/hostname"\n'
        'http:\n  port: 7001\nroutes:\n  messages:\n    pk: message_id\n    subject: "wa.{company}.messages"\n'
    ),
    ".json": json.dumps(VALUES),
}


# Every *_FOR_DYNACONF variable that dynaconf could consult while reading a file ({other}: another settings file
# with a .local twin, {dotenv}: a .env file that sets CDC_NATS__NAME, {main}: the file read). Read with a plain
# Dynaconf(settings_files=[FILE], auto_cast=False, loaders=[], environments=False, load_dotenv=False, includes=[]),
# one at a time they change the result of test_each_dynaconf_variable_changes_nothing for AUTO_CAST_,
# SETTINGS_FILE_, SECRETS_, INCLUDES_, CORE_LOADERS_, ENVIRONMENTS_, NESTED_SEPARATOR_ and ENCODING_FOR_DYNACONF
# (dynaconf.loaders.default_loader sets every option again from os.environ, over what the constructor was given),
# and that reader also takes the .local twin and runs dynaconf_hooks.py.
HOSTILE: dict[str, str] = {
    # files added or substituted
    "SETTINGS_FILE_FOR_DYNACONF": "{other}",
    "SETTINGS_MODULE_FOR_DYNACONF": "{other}",  # its older name
    "ENVVAR_FOR_DYNACONF": "CDC_HIJACK",
    "CDC_HIJACK": "{other}",  # a CDC_ variable without "__" is no setting: config ignores it
    "SECRETS_FOR_DYNACONF": "{other}",
    "INCLUDES_FOR_DYNACONF": "{other}",
    "PRELOAD_FOR_DYNACONF": "{other}",
    "ROOT_PATH_FOR_DYNACONF": "{elsewhere}",
    "SKIP_FILES_FOR_DYNACONF": "{main}",
    "LOAD_DOTENV_FOR_DYNACONF": "true",
    "DOTENV_PATH_FOR_DYNACONF": "{dotenv}",
    "DOTENV_OVERRIDE_FOR_DYNACONF": "true",
    # loaders (the external ones at a loopback port nothing listens on, had they run)
    "CORE_LOADERS_FOR_DYNACONF": "['PY']",
    "LOADERS_FOR_DYNACONF": "['dynaconf.loaders.env_loader', 'dynaconf.loaders.redis_loader']",
    "ENVVAR_PREFIX_FOR_DYNACONF": "DYNACONF",
    "DYNACONF_NATS__NAME": "from-dynaconf-prefix",
    "REDIS_ENABLED_FOR_DYNACONF": "true",
    "REDIS_HOST_FOR_DYNACONF": "127.0.0.1",
    "REDIS_PORT_FOR_DYNACONF": "1",
    "YAML_LOADER_FOR_DYNACONF": "load",
    "COMMENTJSON_ENABLED_FOR_DYNACONF": "true",
    "INSTANCE_FOR_DYNACONF": "os.environ",
    # parsing
    "AUTO_CAST_FOR_DYNACONF": "true",
    "ENCODING_FOR_DYNACONF": "utf-16",
    "ENVIRONMENTS_FOR_DYNACONF": "true",
    "ENV_FOR_DYNACONF": "nats",
    "ENV_SWITCHER_FOR_DYNACONF": "ENV_FOR_DYNACONF",
    "FORCE_ENV_FOR_DYNACONF": "nats",
    "MAIN_ENV_FOR_DYNACONF": "nats",
    "DEFAULT_ENV_FOR_DYNACONF": "nats",
    "MERGE_ENABLED_FOR_DYNACONF": "true",
    "DOTTED_LOOKUP_FOR_DYNACONF": "true",
    "NESTED_SEPARATOR_FOR_DYNACONF": "_",
    "INDEX_SEPARATOR_FOR_DYNACONF": "_",
    "LOWERCASE_READ_FOR_DYNACONF": "false",
    "SYSENV_FALLBACK_FOR_DYNACONF": "true",
    "FRESH_VARS_FOR_DYNACONF": "['NATS', 'HTTP']",
    "VALIDATE_ON_UPDATE_FOR_DYNACONF": "true",
    "APPLY_DEFAULT_ON_NONE_FOR_DYNACONF": "true",
    "SILENT_ERRORS_FOR_DYNACONF": "false",
    "IGNORE_UNKNOWN_ENVVARS_FOR_DYNACONF": "false",
}


def _files(tmp_path: Path, suffix: str) -> tuple[Path, dict[str, str]]:
    """The file to read (with the .local twin and dynaconf_hooks.py dynaconf would also take), and HOSTILE for it."""
    main = tmp_path / f"main{suffix}"
    main.write_text(TEXT[suffix])
    (tmp_path / f"main.local{suffix}").write_text(TEXT[suffix].replace("7001", "7002"))
    (tmp_path / "dynaconf_hooks.py").write_text(
        f"open({str(tmp_path / 'hook-ran')!r}, 'w').close()\ndef post(s):\n    return {{}}\n"
    )
    other = tmp_path / "elsewhere" / "other.toml"
    other.parent.mkdir()
    other.write_text('[http]\nport = 9999\n[nats]\nname = "hijacked"\n')
    (other.parent / "other.local.toml").write_text("[http]\nport = 9998\n")
    dotenv = other.parent / ".env"
    dotenv.write_text("CDC_NATS__NAME=from-dotenv\nDYNACONF_NATS__NAME=from-dotenv\n")
    paths = {"other": str(other), "elsewhere": str(other.parent), "main": str(main), "dotenv": str(dotenv)}
    return main, {name: value.format(**paths) for name, value in HOSTILE.items()}


@pytest.mark.parametrize("suffix", list(TEXT))
def test_dynaconf_variables_change_nothing_in_cli_config(tmp_path: Path, suffix: str) -> None:
    """All of them at once, in the environment of `config --config FILE`: the same output as without them."""
    main, hostile = _files(tmp_path, suffix)
    plain = run_cli(tmp_path, "config", "--config", main.name)
    assert plain.returncode == 0, plain.stderr
    shown = json.loads(plain.stdout)
    tables = {section: keys for section, keys in VALUES.items() if section != "routes"}
    assert {section: {k: shown[section][k] for k in keys} for section, keys in tables.items()} == tables
    assert shown["routes"]["messages"]["pk"] == "message_id"
    result = run_cli(tmp_path, "config", "--config", main.name, **hostile)
    assert result.returncode == 0, result.stderr
    assert (json.loads(result.stdout), result.stderr) == (shown, plain.stderr)
    assert not (tmp_path / "hook-ran").exists()


@pytest.mark.parametrize("suffix", list(TEXT))
@pytest.mark.parametrize("variable", list(HOSTILE))
def test_each_dynaconf_variable_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, suffix: str
) -> None:
    """One at a time, in this process (dynaconf is imported already: what its import reads is the test above)."""
    monkeypatch.chdir(tmp_path)
    main, hostile = _files(tmp_path, suffix)
    expected = load([main], {}).settings
    monkeypatch.setenv(variable, hostile[variable])
    assert load([main], {}).settings == expected
    assert expected.http.port == 7001 and expected.nats.name == "@upper abc"
    assert not (tmp_path / "hook-ran").exists()


UNIMPORTABLE = [("REDIS_PORT_FOR_DYNACONF", "x"), ("INCLUDES_FOR_DYNACONF", "@json [")]


@pytest.mark.parametrize(("variable", "value"), UNIMPORTABLE)
def test_a_variable_dynaconf_cannot_import_with_names_it_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    """dynaconf evaluates its variables when imported (no option prevents it): such a value stops the read with one
    line that says so, without quoting the value, instead of a traceback or a wrong blame on the file."""
    (tmp_path / "main.toml").write_text("[http]\nport = 7001\n")
    result = run_cli(tmp_path, "config", "--config", "main.toml", **{variable: value})
    assert result.returncode == 2
    assert result.stderr == (
        f"cdc_service: invalid setting {tmp_path / 'main.toml'}: cannot read the settings file: dynaconf, which reads "
        f"it, fails to import ({'ValueError' if value == 'x' else 'DynaconfParseError'}); it reads the *_FOR_DYNACONF "
        "environment variables on import: unset them\n"
    )
