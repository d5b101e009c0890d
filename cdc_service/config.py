"""Settings: loaded once from dynaconf, validated, frozen, passed down.

Sources, later winning: the defaults below, ``settings.toml``, ``.secrets.toml`` (both looked up in the working
directory unless ``SETTINGS_FILES_FOR_DYNACONF`` names other files), then environment variables with prefix ``CDC_``
and ``__`` for nesting (``CDC_NATS__URL``, ``CDC_WORKERS__POOL_SIZE``). This is the only module that reads the
environment. A bad value raises ``ConfigError`` whose message starts with the setting's dotted name.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from cdc_service.core.routes import Route, RouteError, compile_route
from cdc_service.core.subjects import LayoutError, SubjectLayout, covers, token_problem

ENV_PREFIX = "CDC"


class ConfigError(ValueError):
    """One setting is invalid; ``str()`` is a single line starting with the setting's name."""


@dataclass(frozen=True)
class NatsSettings:
    url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    name: str = "cdc_service"
    connect_timeout: float = 5.0
    reconnect_wait: float = 2.0
    ping_interval: float = 20.0
    max_outstanding_pings: int = 3
    pending_size_mb: int = 64
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    nkey_seed_file: str = ""
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""


@dataclass(frozen=True)
class IngestSettings:
    stream: str = "cdc_events_stream"
    subjects: tuple[str, ...] = ("cdc.*.*",)
    subject_layout: str = "cdc.{company}.{table}"
    durable: str = "cdc_consumers"
    queue_group: str = "cdc_consumers"
    deliver_subject: str = "deliver.cdc_consumers"
    mode: str = "push"
    ack_wait: float = 30.0
    max_deliver: int = 3
    max_ack_pending: int = 5000
    batch_size: int = 256
    batch_wait_ms: float = 3.0
    fetch_timeout_ms: float = 20.0
    max_payload_bytes: int = 1024 * 1024
    stream_replicas: int = 1
    stream_max_age: float = 7 * 86400.0
    consumer_check_interval: float = 5.0


@dataclass(frozen=True)
class PublishSettings:
    stream: str = "wa_stream"
    subjects: tuple[str, ...] = ("wa.>",)
    duplicate_window: float = 120.0
    timeout: float = 5.0
    max_hold: float = 60.0
    retry_initial: float = 0.2
    retry_max: float = 5.0
    stream_replicas: int = 1
    stream_max_age: float = 86400.0


@dataclass(frozen=True)
class DedupSettings:
    ttl: int = 300
    key_prefix: str = "dedup:"
    mark_timeout: float = 0.5


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    mode: str = "standalone"
    password: str = ""
    socket_timeout: float = 0.5
    retry_interval: float = 1.0
    tls_ca_file: str = ""


@dataclass(frozen=True)
class DlqSettings:
    enabled: bool = True
    stream: str = "cdc_dlq_stream"
    subject_prefix: str = "dlq"
    max_age_days: float = 14.0


@dataclass(frozen=True)
class WorkersSettings:
    pool_size: int = 0
    multiplier: int = 4
    min_size: int = 2

    def resolved_pool_size(self, cpu_count: int | None) -> int:
        """``pool_size`` when set, else ``cpu_count * multiplier``, never below ``min_size``."""
        if self.pool_size > 0:
            return self.pool_size
        return max(self.min_size, (cpu_count or 1) * self.multiplier)


@dataclass(frozen=True)
class HttpSettings:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"
    summary_interval: float = 60.0


@dataclass(frozen=True)
class HealthSettings:
    stall_timeout: float = 120.0


@dataclass(frozen=True)
class ShutdownSettings:
    grace_seconds: float = 20.0


DEFAULT_ROUTES: Mapping[str, Mapping[str, str]] = {
    "messages": {"pk": "message_id", "subject": "wa.{company}.{agent_id}.messages.{chat_id}"},
    "chats": {"pk": "chat_id", "subject": "wa.{company}.{agent_id}.chats"},
    "agents": {"pk": "agent_id", "subject": "wa.{company}.{agent_id}.agents"},
}

SECRET_KEYS = frozenset({"nats.password", "nats.token", "redis.password"})


@dataclass(frozen=True)
class Settings:
    nats: NatsSettings = field(default_factory=NatsSettings)
    ingest: IngestSettings = field(default_factory=IngestSettings)
    publish: PublishSettings = field(default_factory=PublishSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    dlq: DlqSettings = field(default_factory=DlqSettings)
    workers: WorkersSettings = field(default_factory=WorkersSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    log: LogSettings = field(default_factory=LogSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    routes: Mapping[str, Route] = field(
        default_factory=lambda: {t: compile_route(t, r["pk"], r["subject"]) for t, r in DEFAULT_ROUTES.items()}
    )

    @property
    def layout(self) -> SubjectLayout:
        return SubjectLayout(self.ingest.subject_layout)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with every secret and URL password replaced by ``***``."""
        out: dict[str, Any] = {}
        for section in fields(self):
            value = getattr(self, section.name)
            if section.name == "routes":
                out["routes"] = {t: {"pk": r.pk, "subject": r.template} for t, r in value.items()}
                continue
            data: dict[str, Any] = {}
            for item in fields(value):
                raw = getattr(value, item.name)
                key = f"{section.name}.{item.name}"
                if key in SECRET_KEYS and raw:
                    raw = "***"
                elif item.name == "url":
                    raw = [mask_url(u) for u in raw] if isinstance(raw, tuple) else mask_url(raw)
                elif isinstance(raw, tuple):
                    raw = list(raw)
                data[item.name] = raw
            out[section.name] = data
        return out


def mask_url(url: str) -> str:
    """``scheme://user:***@host`` for a URL carrying a password, ``nats://***@host`` for a NATS token URL; other
    URLs unchanged."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    if ":" not in userinfo:
        if parts.scheme in ("nats", "tls", "ws", "wss"):  # nats-py sends a user-only URL's user as the auth token
            return urlunsplit((parts.scheme, f"***@{hostport}", parts.path, parts.query, parts.fragment))
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hostport}", parts.path, parts.query, parts.fragment))


# ---------------------------------------------------------------------------------------------------------------
# Loading and validation


def _lower(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): _lower(v) for k, v in value.items()}
    return value


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: cannot parse URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme not in schemes or not (parts.hostname or (parts.scheme == "unix" and parts.path)):
        raise ConfigError(f"{key}: expected a {'/'.join(schemes)} URL with a host, got {mask_url(url)!r}")
    if port == 0:
        raise ConfigError(f"{key}: port 0 in {mask_url(url)!r}")
    return url


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Turn a raw dynaconf value into the type of ``default``, or raise a ``ConfigError`` naming ``key``."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
            return raw.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if isinstance(default, int):
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise ConfigError(f"{key}: expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if isinstance(default, float):
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise ConfigError(f"{key}: expected a number, got {raw!r}")
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if isinstance(default, tuple):
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
            raise ConfigError(f"{key}: expected a list of strings, got {raw!r}")
        return tuple(raw)
    if not isinstance(raw, (str, int)) or isinstance(raw, bool):
        raise ConfigError(f"{key}: expected a string, got {raw!r}")
    return str(raw)


def _section(name: str, cls: type[Any], raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a table of settings, got {raw!r}")
    known = {f.name: f for f in fields(cls)}
    defaults = cls()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown setting; known: {', '.join(sorted(known))}")
        if f"{name}.{key}" in SECRET_KEYS and (isinstance(value, bool) or not isinstance(value, (str, int))):
            # _coerce would quote the value in its message: never echo a secret.
            raise ConfigError(f"{name}.{key}: expected a string (value not shown: it is a secret)")
        values[key] = _coerce(f"{name}.{key}", value, getattr(defaults, key))
    return cls(**values)


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _validate(s: Settings) -> None:
    for key, value in (
        ("ingest.stream", s.ingest.stream),
        ("ingest.durable", s.ingest.durable),
        ("ingest.queue_group", s.ingest.queue_group),
        ("publish.stream", s.publish.stream),
        ("dlq.stream", s.dlq.stream),
    ):
        _require(bool(_NAME.match(value)), key, f"{value!r} must be letters, digits, '_' or '-'")
    for i, url in enumerate(s.nats.url):
        _check_url(f"nats.url[{i}]", url, ("nats", "tls", "ws", "wss"))
    _require(bool(s.nats.url), "nats.url", "at least one server URL is required")
    _check_url("redis.url", s.redis.url, ("redis", "rediss", "unix"))
    _require(
        not s.redis.tls_ca_file or s.redis.url.startswith("rediss://"),
        "redis.tls_ca_file",
        "is only used with a rediss:// redis.url",
    )
    _require(s.redis.mode in ("standalone", "cluster"), "redis.mode", f"{s.redis.mode!r} is not standalone or cluster")
    if s.redis.mode == "cluster":
        parts = urlsplit(s.redis.url)
        _require(parts.scheme in ("redis", "rediss"), "redis.url", "must be redis:// or rediss:// in cluster mode")
        _require(
            parts.path in ("", "/", "/0") and parse_qs(parts.query).get("db", ["0"]) == ["0"],
            "redis.url",
            "cluster mode has database 0 only: use redis://host:port or redis://host:port/0",
        )
    _require(s.ingest.mode in ("push", "pull"), "ingest.mode", f"{s.ingest.mode!r} is not push or pull")
    try:
        SubjectLayout(s.ingest.subject_layout)
    except LayoutError as exc:
        raise ConfigError(f"ingest.subject_layout: {exc}") from None
    for key, subjects in (("ingest.subjects", s.ingest.subjects), ("publish.subjects", s.publish.subjects)):
        _require(bool(subjects), key, "at least one subject is required")
        for subject in subjects:
            _require(
                all(t and not any(c.isspace() for c in t) for t in subject.split(".")),
                key,
                f"{subject!r} is not a subject",
            )
    for table, route in s.routes.items():
        # A route outside the output stream's subjects would be rejected on every publish, forever.
        if not any(covers(pattern, route.tokens) for pattern in s.publish.subjects):
            raise ConfigError(
                f"routes.{table}.subject: {route.template!r} is not captured by publish.subjects "
                f"{list(s.publish.subjects)}"
            )
    deliver = s.ingest.deliver_subject
    if s.ingest.mode == "push" and any(covers(p, deliver.split(".")) for p in s.ingest.subjects):
        # The server refuses a deliver subject that its own stream captures (a delivery cycle).
        raise ConfigError(f"ingest.deliver_subject: {deliver!r} is captured by ingest.subjects; pick one outside them")
    _require(
        all(not token_problem(t) for t in deliver.split(".")),
        "ingest.deliver_subject",
        f"{deliver!r} is not a literal subject",
    )
    prefix = s.dlq.subject_prefix
    _require(
        all(not token_problem(t) for t in prefix.split(".")),
        "dlq.subject_prefix",
        f"{prefix!r} is not a literal subject",
    )
    positive: tuple[tuple[str, float], ...] = (
        ("ingest.ack_wait", s.ingest.ack_wait),
        ("ingest.max_ack_pending", s.ingest.max_ack_pending),
        ("ingest.batch_size", s.ingest.batch_size),
        ("ingest.fetch_timeout_ms", s.ingest.fetch_timeout_ms),
        ("ingest.max_payload_bytes", s.ingest.max_payload_bytes),
        ("ingest.stream_replicas", s.ingest.stream_replicas),
        ("ingest.consumer_check_interval", s.ingest.consumer_check_interval),
        ("publish.duplicate_window", s.publish.duplicate_window),
        ("publish.timeout", s.publish.timeout),
        ("publish.retry_initial", s.publish.retry_initial),
        ("publish.retry_max", s.publish.retry_max),
        ("publish.stream_replicas", s.publish.stream_replicas),
        ("dedup.ttl", s.dedup.ttl),
        ("dedup.mark_timeout", s.dedup.mark_timeout),
        ("redis.socket_timeout", s.redis.socket_timeout),
        ("redis.retry_interval", s.redis.retry_interval),
        ("dlq.max_age_days", s.dlq.max_age_days),
        ("workers.multiplier", s.workers.multiplier),
        ("workers.min_size", s.workers.min_size),
        ("nats.connect_timeout", s.nats.connect_timeout),
        ("nats.ping_interval", s.nats.ping_interval),
        ("nats.pending_size_mb", s.nats.pending_size_mb),
        ("log.summary_interval", s.log.summary_interval),
        ("health.stall_timeout", s.health.stall_timeout),
        ("shutdown.grace_seconds", s.shutdown.grace_seconds),
    )
    for key, number in positive:
        _require(number > 0, key, f"must be greater than 0, got {number}")
    non_negative: tuple[tuple[str, float], ...] = (
        ("ingest.batch_wait_ms", s.ingest.batch_wait_ms),
        ("workers.pool_size", s.workers.pool_size),
        ("publish.max_hold", s.publish.max_hold),
        ("ingest.stream_max_age", s.ingest.stream_max_age),
        ("publish.stream_max_age", s.publish.stream_max_age),
        ("nats.reconnect_wait", s.nats.reconnect_wait),
    )
    for key, number in non_negative:
        _require(number >= 0, key, f"must not be negative, got {number}")
    _require(
        s.ingest.max_deliver >= 1 or s.ingest.max_deliver == -1,
        "ingest.max_deliver",
        f"must be at least 1, or -1 for unlimited, got {s.ingest.max_deliver}",
    )
    _require(0 < s.http.port < 65536, "http.port", f"{s.http.port} is not a TCP port")
    _require(
        s.log.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        "log.level",
        f"{s.log.level!r} is not a log level",
    )
    _require(
        s.publish.stream_max_age == 0 or s.publish.stream_max_age >= s.publish.duplicate_window,
        "publish.stream_max_age",
        "must be 0 (unlimited) or at least publish.duplicate_window",
    )
    # JetStream only deduplicates inside the window; a retried publish must still land inside it.
    _require(
        s.publish.duplicate_window >= s.publish.timeout * 2,
        "publish.duplicate_window",
        f"{s.publish.duplicate_window}s is shorter than two publish timeouts",
    )


def _routes(raw: Any) -> dict[str, Route]:
    if raw is None:
        raw = DEFAULT_ROUTES
    if not isinstance(raw, Mapping):
        raise ConfigError(f"routes: expected a table of tables, got {raw!r}")
    routes: dict[str, Route] = {}
    for table, spec in raw.items():
        key = f"routes.{table}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{key}: expected pk and subject, got {spec!r}")
        unknown = set(spec) - {"pk", "subject"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown setting; known: pk, subject")
        base = DEFAULT_ROUTES.get(table, {})
        pk, subject = spec.get("pk", base.get("pk")), spec.get("subject", base.get("subject"))
        if not isinstance(pk, str) or not pk:
            raise ConfigError(f"{key}.pk: a column name is required")
        if not isinstance(subject, str) or not subject:
            raise ConfigError(f"{key}.subject: a subject template is required")
        try:
            routes[table] = compile_route(table, pk, subject)
        except RouteError as exc:
            # Name the key that holds the bad value: the table name itself, or its subject template.
            raise ConfigError(f"{key if token_problem(table) else key + '.subject'}: {exc}") from None
    return routes


_SECTIONS: dict[str, type[Any]] = {
    "nats": NatsSettings,
    "ingest": IngestSettings,
    "publish": PublishSettings,
    "dedup": DedupSettings,
    "redis": RedisSettings,
    "dlq": DlqSettings,
    "workers": WorkersSettings,
    "http": HttpSettings,
    "log": LogSettings,
    "health": HealthSettings,
    "shutdown": ShutdownSettings,
}


def settings_from_mapping(raw: Mapping[str, Any]) -> Settings:
    """Build and validate ``Settings`` from plain nested data (keys in any case)."""
    data = _lower(raw)
    sections = {name: _section(name, cls, data.get(name)) for name, cls in _SECTIONS.items()}
    raw_routes = data.get("routes")
    if isinstance(raw_routes, Mapping):
        # Defaults stay unless a table is redefined; a table can be dropped with routes.<table> = false.
        merged: dict[str, Any] = {t: dict(r) for t, r in DEFAULT_ROUTES.items()}
        for table, spec in raw_routes.items():
            if spec is False:
                merged.pop(table, None)
            elif isinstance(spec, Mapping):
                merged[table] = {**merged.get(table, {}), **spec}
            else:
                merged[table] = spec
        raw_routes = merged
    settings = Settings(**sections, routes=_routes(raw_routes))
    _validate(settings)
    return settings


def load_settings() -> Settings:
    """Load ``settings.toml``, ``.secrets.toml`` and ``CDC_*`` variables; raise ``ConfigError`` on a bad value."""
    from dynaconf import Dynaconf  # imported here so the pure modules never pull dynaconf in

    files = os.environ.get("SETTINGS_FILES_FOR_DYNACONF")
    settings_files = [f.strip() for f in files.split(",") if f.strip()] if files else ["settings.toml", ".secrets.toml"]
    loader = Dynaconf(
        envvar_prefix=ENV_PREFIX,
        settings_files=settings_files,
        environments=False,
        load_dotenv=False,
        root_path=os.getcwd(),
    )
    try:
        raw = loader.as_dict()
    except Exception as exc:  # a malformed TOML file or env value
        raise ConfigError(f"settings: cannot read settings files or CDC_* variables: {exc}") from None
    known = {*_SECTIONS, "routes"}
    unknown = sorted(k.lower() for k in raw if k.lower() not in known and k.lower() not in _DYNACONF_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown settings section; known: {', '.join(sorted(known))}")
    return settings_from_mapping({k: v for k, v in raw.items() if k.lower() in known})


_DYNACONF_KEYS = frozenset({"load_dotenv"})  # what dynaconf itself reports among the settings
