"""Settings: defaults, loading with CDC_* overrides, validation errors, pool sizing, masking, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cdc_service.config import (
    ROUTING_CACHE_DEFAULT,
    ConfigError,
    IngestSettings,
    NatsSettings,
    RedisSettings,
    Settings,
    WorkersSettings,
    load_settings,
    mask_url,
    settings_from_mapping,
)
from cdc_service.core.routes import compile_route
from tests.servers import run_cli

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the repository's own settings.toml and .secrets.toml (CDC_* variables are already cleared)."""
    monkeypatch.chdir(REPO)


# ------------------------------------------------------------------------------------------------ loading


def test_defaults_equal_settings_toml(in_repo: None) -> None:
    assert load_settings() == Settings()


def test_defaults_have_the_designed_values() -> None:
    s = Settings()
    assert s.nats.url == ("nats://127.0.0.1:4222",)
    assert (s.ingest.stream, s.ingest.subjects, s.ingest.subject_layout) == (
        "cdc_events_stream",
        ("cdc.*.*",),
        "cdc.{company}.{table}",
    )
    assert (s.ingest.durable, s.ingest.queue_group, s.ingest.mode) == ("cdc_consumers", "cdc_consumers", "push")
    assert (s.ingest.ack_wait, s.ingest.max_deliver, s.ingest.max_ack_pending) == (30.0, 3, 5000)
    assert (s.publish.stream, s.publish.subjects, s.publish.duplicate_window) == ("wa_stream", ("wa.>",), 120.0)
    assert (s.dedup.ttl, s.dedup.key_prefix) == (300, "dedup:")
    assert (s.dlq.enabled, s.dlq.stream, s.dlq.subject_prefix) == (True, "cdc_dlq_stream", "dlq")
    assert s.http.port == 8080
    assert s.shutdown.grace_seconds == 20.0
    assert {t: (r.pk, r.template) for t, r in s.routes.items()} == {
        "messages": ("message_id", "wa.{company}.{agent_id}.messages.{chat_id}"),
        "chats": ("chat_id", "wa.{company}.{agent_id}.chats"),
        "agents": ("agent_id", "wa.{company}.{agent_id}.agents"),
    }
    assert s.layout.text == "cdc.{company}.{table}"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.http.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "check"),
    [
        ({"CDC_NATS__URL": "nats://a:4222"}, lambda s: s.nats.url == ("nats://a:4222",)),
        (
            {"CDC_NATS__URL": "nats://a:4222, tls://b:4223,nats://c:4224"},
            lambda s: s.nats.url == ("nats://a:4222", "tls://b:4223", "nats://c:4224"),
        ),
        ({"CDC_WORKERS__POOL_SIZE": "12"}, lambda s: s.workers.pool_size == 12),
        ({"CDC_HTTP__PORT": "9090"}, lambda s: s.http.port == 9090),
        ({"CDC_INGEST__MAX_DELIVER": "-1"}, lambda s: s.ingest.max_deliver == -1),
        ({"CDC_INGEST__BATCH_WAIT_MS": "0"}, lambda s: s.ingest.batch_wait_ms == 0.0),
        ({"CDC_DLQ__ENABLED": "false"}, lambda s: s.dlq.enabled is False),
        ({"CDC_REDIS__URL": "rediss://:pw@redis:6380/1"}, lambda s: s.redis.url == "rediss://:pw@redis:6380/1"),
        ({"CDC_NATS__PASSWORD": "hunter2"}, lambda s: s.nats.password == "hunter2"),
        ({"CDC_INGEST__SUBJECTS": '["sequin.changes.>"]'}, lambda s: s.ingest.subjects == ("sequin.changes.>",)),
        (
            {
                "CDC_INGEST__SUBJECTS": '["sequin.changes.>"]',
                "CDC_INGEST__SUBJECT_LAYOUT": "sequin.changes.{database}.{schema}.{table}.{action}",
            },
            lambda s: s.layout.parse("sequin.changes.db.public.chats.insert").table == "chats",
        ),
        (
            {"CDC_ROUTES__MESSAGES__SUBJECT": "wa.{company}.m.{chat_id}"},
            lambda s: (
                (s.routes["messages"].pk, s.routes["messages"].template) == ("message_id", "wa.{company}.m.{chat_id}")
            ),
        ),
    ],
)
def test_env_overrides(in_repo: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], check: Any) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert check(settings)
    assert settings != Settings()


def test_env_adds_a_route(in_repo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_ROUTES__CONTACTS__PK", "contact_id")
    monkeypatch.setenv("CDC_ROUTES__CONTACTS__SUBJECT", "wa.{company}.contacts.{contact_id}")
    routes = load_settings().routes
    assert set(routes) == {"messages", "chats", "agents", "contacts"}
    assert routes["contacts"] == compile_route("contacts", "contact_id", "wa.{company}.contacts.{contact_id}")
    assert routes["messages"] == Settings().routes["messages"]


def test_env_removes_a_route(in_repo: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDC_ROUTES__AGENTS", "false")
    assert set(load_settings().routes) == {"messages", "chats"}


def test_settings_files_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text("[http]\nport = 7000\n[workers]\npool_size = 3\n")
    (tmp_path / "b.toml").write_text("[http]\nport = 7001\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SETTINGS_FILES_FOR_DYNACONF", "a.toml,b.toml")
    settings = load_settings()
    assert (settings.http.port, settings.workers.pool_size) == (7001, 3)
    monkeypatch.setenv("CDC_HTTP__PORT", "7002")
    assert load_settings().http.port == 7002  # env wins over files


def test_no_settings_file_gives_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings() == Settings()


# ------------------------------------------------------------------------------------------------ validation

BAD_VALUES: list[tuple[str, dict[str, Any]]] = [
    ("ingest.batch_size", {"ingest": {"batch_size": -1}}),
    ("ingest.batch_size", {"ingest": {"batch_size": 0}}),
    ("ingest.batch_size", {"ingest": {"batch_size": "many"}}),
    ("ingest.batch_size", {"ingest": {"batch_size": True}}),
    ("ingest.ack_wait", {"ingest": {"ack_wait": "soon"}}),
    ("ingest.consumer_check_interval", {"ingest": {"consumer_check_interval": 0}}),
    ("ingest.subject_layout", {"ingest": {"subject_layout": "cdc.{tenant}.{table}"}}),
    ("ingest.subject_layout", {"ingest": {"subject_layout": "cdc.{company}"}}),
    ("ingest.subjects", {"ingest": {"subjects": []}}),
    ("ingest.subjects", {"ingest": {"subjects": ["cdc..x"]}}),
    ("ingest.subjects", {"ingest": {"subjects": 5}}),
    ("ingest.mode", {"ingest": {"mode": "sideways"}}),
    ("ingest.max_deliver", {"ingest": {"max_deliver": 0}}),
    ("ingest.max_deliver", {"ingest": {"max_deliver": -2}}),
    ("ingest.batchsize", {"ingest": {"batchsize": 10}}),
    ("ingest.stream", {"ingest": {"stream": "cdc.events"}}),
    ("ingest.deliver_subject", {"ingest": {"deliver_subject": "deliver.*"}}),
    ("ingest.batch_wait_ms", {"ingest": {"batch_wait_ms": -1}}),
    ("ingest", {"ingest": "yes"}),
    ("redis.url", {"redis": {"url": "redis://host:notaport/0"}}),
    ("redis.url", {"redis": {"url": "http://host:6379"}}),
    ("redis.url", {"redis": {"url": "redis://host:0"}}),
    ("redis.url", {"redis": {"url": "unix://"}}),
    ("redis.url", {"redis": {"url": "redis:///0"}}),
    ("redis.mode", {"redis": {"mode": "sentinel"}}),
    ("nats.url", {"nats": {"url": "localhost:4222"}}),
    ("nats.url", {"nats": {"url": "not a url"}}),
    ("nats.url", {"nats": {"url": "nats://ok:4222,http://bad"}}),
    ("nats.url", {"nats": {"url": []}}),
    ("nats.reconnect_wait", {"nats": {"reconnect_wait": -1}}),
    ("http.port", {"http": {"port": 70000}}),
    ("http.port", {"http": {"port": 0}}),
    ("workers.pool_size", {"workers": {"pool_size": -1}}),
    ("workers.min_size", {"workers": {"min_size": 0}}),
    ("dlq.enabled", {"dlq": {"enabled": "maybe"}}),
    ("nats.name", {"nats": {"name": 7}}),  # a string setting takes a string: 0x1F would arrive as "31"
    ("dlq.subject_prefix", {"dlq": {"subject_prefix": "dlq.>"}}),
    ("log.level", {"log": {"level": "LOUD"}}),
    ("publish.duplicate_window", {"publish": {"duplicate_window": 5.0, "timeout": 5.0}}),
    ("publish.max_hold", {"publish": {"max_hold": -0.5}}),
    # a claim must outlive a publish attempt and be gone before AckWait redelivers a dead replica's messages
    ("dedup.claim_ttl", {"dedup": {"claim_ttl": 5.0}, "publish": {"timeout": 5.0}}),
    ("dedup.claim_ttl", {"dedup": {"claim_ttl": 30.0}}),
    ("dedup.claim_ttl", {"ingest": {"ack_wait": 2}}),
    ("dedup.claim_ttl", {"dedup": {"claim_ttl": -1}}),
    ("routes.x.subject", {"routes": {"x": {"pk": "id", "subject": "wa.{agent_id}"}}}),
    ("routes.x.subject", {"routes": {"x": {"pk": "id", "subject": "wa.*.{company}"}}}),
    ("routes.x.subject", {"routes": {"x": {"pk": "id"}}}),
    ("routes.x.pk", {"routes": {"x": {"subject": "wa.{company}.x"}}}),
    ("routes.x.topic", {"routes": {"x": {"pk": "id", "subject": "wa.{company}", "topic": "y"}}}),
    ("routes.x", {"routes": {"x": "wa.{company}"}}),
    ("routes.a.b", {"routes": {"a.b": {"pk": "id", "subject": "wa.{company}"}}}),
    ("routes.messages.subject", {"routes": {"messages": {"subject": "wa.{agent_id}.messages"}}}),
    # a route the output stream does not capture would be rejected on every publish
    ("routes.contacts.subject", {"routes": {"contacts": {"pk": "id", "subject": "ws.{company}.contacts"}}}),
    ("routes.messages.subject", {"publish": {"subjects": ["wa.*.*.chats"]}}),
    # the server refuses a deliver subject its own stream captures
    ("ingest.deliver_subject", {"ingest": {"deliver_subject": "cdc.deliver.x"}}),
    ("ingest.deliver_subject", {"ingest": {"subjects": [">"]}}),
    # partitioned ordering
    ("ingest.ordering", {"ingest": {"ordering": "global"}}),
    ("ingest.partitions", {"ingest": {"partitions": 0}}),
    ("ingest.partitions", {"ingest": {"partitions": 5000}}),
    ("ingest.subjects", {"ingest": {"ordering": "partitioned", "subjects": ["cdc.acme.*"]}}),
    ("ingest.subjects", {"ingest": {"ordering": "partitioned", "subjects": ["cdc.>"]}}),
    ("ingest.partition_stream", {"ingest": {"ordering": "partitioned", "partition_stream": "cdc_events_stream"}}),
    ("ingest.partition_stream", {"ingest": {"partition_stream": "a.b"}}),
    ("ingest.member_bucket", {"ingest": {"member_bucket": "a b"}}),
    ("ingest.member_ttl", {"ingest": {"member_ttl": 0}}),
    ("ingest.pin_timeout", {"ingest": {"pin_timeout": -1}}),
    ("nats.provision_timeout", {"nats": {"provision_timeout": 0}}),
]


def test_claim_ttl_between_publish_timeout_and_ack_wait_or_off() -> None:
    assert settings_from_mapping({}).dedup.claim_ttl == 8.0
    short = {"ingest": {"ack_wait": 2}, "publish": {"timeout": 0.5}}
    assert settings_from_mapping({**short, "dedup": {"claim_ttl": 1}}).dedup.claim_ttl == 1
    assert settings_from_mapping({**short, "dedup": {"claim_ttl": 0}}).dedup.claim_ttl == 0


@pytest.mark.parametrize(("key", "raw"), [pytest.param(k, r, id=f"{k}-{i}") for i, (k, r) in enumerate(BAD_VALUES)])
def test_bad_values(key: str, raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(raw)
    message = str(info.value)
    assert message.startswith(key)
    assert message[len(key)] in ":["  # the key, not a longer key that starts with it
    assert "\n" not in message


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"CDC_INGEST__BATCH_SIZE": "-1"}, "ingest.batch_size"),
        ({"CDC_INGEST__SUBJECT_LAYOUT": "cdc.{tenant}.{table}"}, "ingest.subject_layout"),
        ({"CDC_REDIS__URL": "redis://h:abc/0"}, "redis.url"),
        ({"CDC_NATS__URL": "localhost"}, "nats.url"),
        ({"CDC_INGEST__MODE": "sideways"}, "ingest.mode"),
        ({"CDC_HTTP__PORT": "70000"}, "http.port"),
        ({"CDC_INGEST__BATCHSIZE": "10"}, "ingest.batchsize"),
        ({"CDC_ROUTES__X__PK": "id", "CDC_ROUTES__X__SUBJECT": "wa.{agent_id}"}, "routes.x.subject"),
        ({"CDC_INGESTS__MODE": "pull"}, "ingests"),  # a misspelt section is refused, not ignored
    ],
)
def test_bad_env_values(in_repo: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], key: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{key}:") or str(info.value).startswith(f"{key}[")


def test_bad_url_error_does_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"redis": {"url": "http://:hunter2@host"}})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "check"),
    [
        ({"INGEST": {"BATCH_SIZE": "8"}}, lambda s: s.ingest.batch_size == 8),  # keys in any case, numbers as text
        ({"ingest": {"ack_wait": 10}}, lambda s: s.ingest.ack_wait == 10.0 and isinstance(s.ingest.ack_wait, float)),
        ({"dlq": {"enabled": "no"}}, lambda s: s.dlq.enabled is False),
        ({"dlq": {"enabled": "1"}}, lambda s: s.dlq.enabled is True),
        ({"nats": {"url": ["nats://a:1", "nats://b:2"]}}, lambda s: s.nats.url == ("nats://a:1", "nats://b:2")),
        ({"routes": {}}, lambda s: set(s.routes) == {"messages", "chats", "agents"}),
        ({"routes": {"chats": False, "agents": False}}, lambda s: set(s.routes) == {"messages"}),
        ({"routes": {"chats": {"pk": "id"}}}, lambda s: s.routes["chats"].template == "wa.{company}.{agent_id}.chats"),
        ({"redis": {"url": "unix:///tmp/redis.sock?db=1"}}, lambda s: s.redis.url == "unix:///tmp/redis.sock?db=1"),
        ({"nats": {"url": "ws://h:80,wss://h:443"}}, lambda s: s.nats.url == ("ws://h:80", "wss://h:443")),
    ],
)
def test_mapping_values(raw: dict[str, Any], check: Any) -> None:
    assert check(settings_from_mapping(raw))


def test_empty_mapping_gives_defaults() -> None:
    assert settings_from_mapping({}) == Settings()


# ------------------------------------------------------------------------------------------------ pool size


@pytest.mark.parametrize(
    ("workers", "cpu_count", "size"),
    [
        (WorkersSettings(pool_size=7), 64, 7),  # an explicit size wins
        (WorkersSettings(pool_size=1, min_size=4), 8, 1),  # even below min_size
        (WorkersSettings(), 2, 8),  # cpu * 4
        (WorkersSettings(), 16, 64),
        (WorkersSettings(multiplier=1), 1, 2),  # min_size floor
        (WorkersSettings(multiplier=1, min_size=10), 4, 10),
        (WorkersSettings(multiplier=3, min_size=1), 5, 15),
        (WorkersSettings(), None, 4),  # unknown CPU count counts as 1
        (WorkersSettings(multiplier=1), None, 2),
        (WorkersSettings(pool_size=0, multiplier=2, min_size=2), 0, 2),
    ],
)
def test_resolved_pool_size(workers: WorkersSettings, cpu_count: int | None, size: int) -> None:
    assert workers.resolved_pool_size(cpu_count) == size


# ------------------------------------------------------------------------------------------------ masking


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://user:pass@host:4222", "nats://user:***@host:4222"),
        ("tls://user:p%40ss@host:4222", "tls://user:***@host:4222"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:pw@redis:6380/1?ssl_cert_reqs=none", "rediss://default:***@redis:6380/1?ssl_cert_reqs=none"),
        ("redis://u:p@ss@host/0", "redis://u:***@host/0"),  # an '@' inside the password
        ("redis://user@host:6379", "redis://user@host:6379"),  # a Redis user name is not a secret
        ("nats://s3cr3t-token@host:4222", "nats://***@host:4222"),  # nats-py sends it as the auth token
        ("wss://tok@host:443", "wss://***@host:443"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("", ""),
        ("not a url", "not a url"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_masked_hides_every_secret() -> None:
    settings = Settings(
        nats=NatsSettings(
            url=("nats://u:natspw@a:4222", "nats://natstok@b:4222"), user="u", password="natspw", token="natstok"
        ),
        redis=RedisSettings(url="redis://:redispw@r:6379/0", password="redispw"),
    )
    masked = settings.masked()
    text = json.dumps(masked)
    for secret in ("natspw", "natstok", "redispw"):
        assert secret not in text
    assert masked["nats"]["password"] == "***"
    assert masked["nats"]["token"] == "***"
    assert masked["nats"]["user"] == "u"
    assert masked["redis"]["password"] == "***"
    assert masked["nats"]["url"] == ["nats://u:***@a:4222", "nats://***@b:4222"]
    assert masked["redis"]["url"] == "redis://:***@r:6379/0"


def test_masked_shape() -> None:
    masked = Settings().masked()
    assert list(masked) == [
        "nats",
        "ingest",
        "publish",
        "dedup",
        "redis",
        "dlq",
        "workers",
        "http",
        "log",
        "health",
        "shutdown",
        "routes",
    ]
    assert masked["nats"]["password"] == ""  # empty secrets stay empty: nothing to hide
    assert masked["ingest"]["subjects"] == ["cdc.*.*"]
    assert masked["routes"]["messages"] == {
        "pk": "message_id",
        "subject": "wa.{company}.{agent_id}.messages.{chat_id}",
        "routing_cache": ROUTING_CACHE_DEFAULT,
    }
    assert json.loads(json.dumps(masked)) == masked  # plain JSON data


def test_masked_with_override_ingest() -> None:
    masked = Settings(ingest=IngestSettings(subjects=("a.>", "b.>"))).masked()
    assert masked["ingest"]["subjects"] == ["a.>", "b.>"]


# ------------------------------------------------------------------------------------------------ command line


def test_cli_bad_setting_exits_2_with_one_line() -> None:
    result = run_cli(REPO, CDC_INGEST__BATCH_SIZE="-1")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "ingest.batch_size" in lines[0]
    assert result.stdout == ""


def test_cli_config_masks_secrets() -> None:
    result = run_cli(REPO, "config", CDC_NATS__PASSWORD="hunter2", CDC_HTTP__PORT="9191")
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout
    printed = json.loads(result.stdout)
    assert printed["nats"]["password"] == "***"
    assert printed["http"]["port"] == 9191


def test_cli_help() -> None:
    result = run_cli(REPO, "--help")
    assert result.returncode == 0
    assert "config" in result.stdout
    assert "run" in result.stdout


def test_pull_mode_does_not_check_the_deliver_subject() -> None:
    settings = settings_from_mapping({"ingest": {"mode": "pull", "subjects": [">"]}})
    assert settings.ingest.mode == "pull"
