"""Settings: declared once, loaded once, validated, frozen, passed down.

Each setting is one field of a section dataclass below, declared with ``setting(default, doc, **rules)``: its type
comes from the annotation, its bounds and other rules from the keyword arguments, and whether it is a secret. Parsing,
validation, masking, the ``config`` output and the settings reference in ``docs/settings.md`` all derive from these
declarations (``tests/unit/test_settings_model.py`` keeps the docs and the Helm values schema in step). Adding a
setting is one line here (plus its line in ``settings.toml``).

Sources, later winning key by key (a table in a later file changes only the keys it names):
1. the defaults declared here;
2. ``settings.toml`` and 3. ``.secrets.toml`` in the working directory, when present;
4. the files named by ``CDC_SETTINGS_FILES`` (comma-separated; ``SETTINGS_FILES_FOR_DYNACONF``, its older name, when
   it is unset or names the same files), then those given with ``--config FILE``;
5. environment variables ``CDC_<SECTION>__<KEY>``. Their values are text: a string setting takes it exactly as
   written, a number, boolean or list setting parses it.
dynaconf reads each file, configured in code so that a file's values are taken exactly as its format (TOML, YAML 1.2
or JSON) gives them: no ``@`` markers, templates, includes or ``*_FOR_DYNACONF`` variables (``_read_file``). This is
the only module that reads the environment. A bad value raises ``ConfigError`` whose message is one line starting
with the setting's dotted name (or the file's path or the variable) and never quotes a secret; an unknown key names
the file or variable it came from.
"""

from __future__ import annotations

import json
import math
import os
import re
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from cdc_service.core.partitions import PartitionError, ordering_key
from cdc_service.core.partitions import transform as partition_transform
from cdc_service.core.routes import Route, RouteError, compile_route
from cdc_service.core.subjects import LayoutError, SubjectLayout, covers, token_problem

ENV_PREFIX = "CDC"
FILES_VARIABLE = "CDC_SETTINGS_FILES"
LEGACY_FILES_VARIABLE = "SETTINGS_FILES_FOR_DYNACONF"  # what the chart and older deployments set
DEFAULT_FILES = ("settings.toml", ".secrets.toml")
FILE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")  # read as data only (_read_file); never .py, which would run code

NATS_SCHEMES = ("nats", "tls", "ws", "wss")
REDIS_SCHEMES = ("redis", "rediss", "unix")
JETSTREAM_MAX_REPLICAS = 5

T = TypeVar("T")


class ConfigError(ValueError):
    """One setting is invalid; ``str()`` is a single line starting with the setting's name."""


# ---------------------------------------------------------------------------------------------------------------
# Declaring a setting


@dataclass(frozen=True)
class Rule:
    """What a declaration says about one setting besides its type and default."""

    doc: str = ""
    secret: bool = False  # never shown: masked in `config`, in logs and in error lines
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    allow: tuple[float, ...] = ()  # numbers allowed outside the bounds (e.g. -1 = unlimited)
    choices: tuple[str, ...] = ()
    url: tuple[str, ...] = ()  # a URL (or list of URLs) with one of these schemes; masked when shown
    file: bool = False  # a path that must name an existing file, when set
    non_empty: bool = False
    check: Callable[[Any], str | None] | None = None  # further rule: returns what is wrong, or None; its docstring
    # names the rule in docs/settings.md


_RULE = "cdc_setting"
_UNDECLARED = Rule()  # a field declared without setting(): type-checked only (the model test asks for a doc)


def setting(default: T, doc: str, **rule: Any) -> T:
    """Declare a setting: its default, one line of documentation, and the rules of ``Rule``."""
    declared: T = field(default=default, metadata={_RULE: Rule(doc, **rule)})
    return declared


_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def _jetstream_name(value: str) -> str | None:
    """letters, digits, `_`, `-`"""
    return None if _NAME.match(value) else "must be letters, digits, '_' or '-'"


def _subjects(value: tuple[str, ...]) -> str | None:
    """NATS subjects (wildcards allowed)"""
    for subject in value:
        if not all(t and not any(c.isspace() for c in t) for t in subject.split(".")):
            return f"{subject!r} is not a subject"
    return None


def _literal_subject(value: str) -> str | None:
    """a subject without wildcards"""
    return None if all(not token_problem(t) for t in value.split(".")) else f"{value!r} is not a literal subject"


def _layout(value: str) -> str | None:
    """a subject layout"""
    try:
        SubjectLayout(value)
    except LayoutError as exc:
        return str(exc)
    return None


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str | None:
    """a log level, any case"""
    return None if value.upper() in _LOG_LEVELS else f"{value!r} is not one of {', '.join(_LOG_LEVELS)}"


# ---------------------------------------------------------------------------------------------------------------
# The settings


@dataclass(frozen=True)
class NatsSettings:
    url: tuple[str, ...] = setting(
        ("nats://127.0.0.1:4222",),
        "Server URL, or a list (or comma-separated string) for a cluster. Schemes `nats`, `tls`, `ws`, `wss`.",
        url=NATS_SCHEMES,
        non_empty=True,
    )
    name: str = setting("cdc_service", "Connection name shown by the server.")
    connect_timeout: float = setting(5.0, "Timeout of one connection attempt; start-up retries without end.", gt=0)
    reconnect_wait: float = setting(
        2.0, "Pause between (re)connect attempts. Reconnects never stop; a closed connection exits (status 1).", ge=0
    )
    provision_timeout: float = setting(
        60.0,
        "Start-up: how long to retry JetStream requests that time out or are unavailable while the cluster elects "
        "leaders (streams, consumers); then start-up fails (status 1).",
        gt=0,
    )
    ping_interval: float = setting(20.0, "Seconds between pings; see max_outstanding_pings.", gt=0)
    max_outstanding_pings: int = setting(
        3, "Unanswered pings before the link counts as dead (after about ping_interval × this).", gt=0
    )
    pending_size_mb: int = setting(
        64, "Client buffer for publishes and acks while reconnecting; past it publishes fail and are retried.", gt=0
    )
    user: str = setting("", "User name; its password is nats.password.")
    password: str = setting("", "Password for nats.user.", secret=True)
    token: str = setting("", "Authentication token.", secret=True)
    creds_file: str = setting("", "JWT credentials file.", file=True)
    nkey_seed_file: str = setting("", "NKey seed file.", file=True)
    tls_ca_file: str = setting("", "CA bundle for TLS.", file=True)
    tls_cert_file: str = setting("", "Client certificate for mutual TLS.", file=True)
    tls_key_file: str = setting("", "Client key for mutual TLS.", file=True)


@dataclass(frozen=True)
class IngestSettings:
    stream: str = setting("cdc_events_stream", "Input stream.", check=_jetstream_name)
    subjects: tuple[str, ...] = setting(
        ("cdc.*.*",), "The input stream's subjects (added to an existing stream) and the consumer's filter.",
        non_empty=True, check=_subjects,
    )  # fmt: skip
    subject_layout: str = setting(
        "cdc.{company}.{table}",
        "What each token of an inbound subject means: `{company}`, `{table}` (required), `{database}`, `{schema}`, "
        "`{action}` or literal text; a token may add literal text around one field: `cdc.daisi_{company}.{table}`.",
        check=_layout,
    )
    durable: str = setting("cdc_consumers", "Durable consumer name.", check=_jetstream_name)
    queue_group: str = setting("cdc_consumers", "Push mode: the queue group.", check=_jetstream_name)
    deliver_subject: str = setting(
        "deliver.cdc_consumers",
        "Push mode: the fixed deliver subject, outside ingest.subjects.",
        check=_literal_subject,
    )
    mode: str = setting("push", "`push` (queue group) or `pull` (shared pull durable).", choices=("push", "pull"))
    ack_wait: float = setting(30.0, "Consumer AckWait; the keep-alive period is min(5, ack_wait / 3).", gt=0)
    max_deliver: int = setting(
        3, "Consumer MaxDeliver; the final attempt dead-letters what still fails. -1 = unlimited.", ge=1, allow=(-1,)
    )
    max_ack_pending: int = setting(5000, "Consumer MaxAckPending, shared by all replicas.", gt=0)
    batch_size: int = setting(256, "Most messages per micro-batch (push buffer; pull fetch size).", gt=0)
    batch_wait_ms: float = setting(6.0, "Push mode: longest wait for a batch to fill after its first message.", ge=0)
    fetch_timeout_ms: float = setting(20.0, "Pull mode: how long one fetch waits for messages.", gt=0)
    max_payload_bytes: int = setting(1024 * 1024, "Larger bodies are dead-lettered unparsed.", gt=0)
    max_inflight_mb: int = setting(
        256, "Intake waits while this many MiB of payload are in flight (a memory bound by bytes).", gt=0
    )
    stream_replicas: int = setting(
        1, "Replicas of the input stream, when the service creates it.", gt=0, le=JETSTREAM_MAX_REPLICAS
    )
    stream_max_age: float = setting(
        7 * 86400.0, "Max age of the input stream when the service creates it; 0 = unlimited.", ge=0
    )
    consumer_check_interval: float = setting(5.0, "Period of the watchdog that recreates a deleted durable.", gt=0)
    ordering: str = setting(
        "replica",
        "`replica`: order within one replica only. `partitioned`: order per company (Sequin layout: per schema) "
        "across replicas, through crashes and rolling updates; needs nats-server 2.11+.",
        choices=("replica", "partitioned"),
    )
    partitions: int = setting(
        8, "Partitioned mode: partition count; fixed when ingest.partition_stream is created.", ge=1, le=1024
    )
    partition_stream: str = setting(
        "cdc_events_partitioned",
        "Partitioned mode: the stream sourced from ingest.stream that stores `<partition>.<subject>`.",
        check=_jetstream_name,
    )
    member_bucket: str = setting("cdc_members", "Partitioned mode: KV bucket of live replicas.", check=_jetstream_name)
    member_ttl: float = setting(
        10.0, "Partitioned mode: a replica silent this long loses its partitions; keys are rewritten every third.", gt=0
    )
    pin_timeout: float = setting(
        30.0, "Partitioned mode: a partition's pin with no pull request for this long is released.", gt=0
    )


@dataclass(frozen=True)
class PublishSettings:
    stream: str = setting("wa_stream", "Output stream; also sent as Nats-Expected-Stream.", check=_jetstream_name)
    subjects: tuple[str, ...] = setting(
        ("wa.>",), "Output stream subjects; every route's subject must fall under them.", non_empty=True,
        check=_subjects,
    )  # fmt: skip
    duplicate_window: float = setting(
        120.0, "The output stream's Nats-Msg-Id window; at least 2 × publish.timeout.", gt=0
    )
    timeout: float = setting(5.0, "How long one publish attempt waits for its PubAck.", gt=0)
    max_hold: float = setting(60.0, "How long a failing publish is retried in process before nak(delay).", ge=0)
    retry_initial: float = setting(0.2, "First in-process retry delay (doubles, plus jitter).", gt=0)
    retry_max: float = setting(5.0, "Longest in-process retry delay.", gt=0)
    stream_replicas: int = setting(
        1, "Replicas of the output and dead-letter streams, when the service creates them.", gt=0,
        le=JETSTREAM_MAX_REPLICAS,
    )  # fmt: skip
    stream_max_age: float = setting(
        86400.0, "Max age of the output stream when the service creates it; 0 = unlimited.", ge=0
    )
    fast_batch: bool = setting(
        False,
        "Publish events in JetStream fast-ingest batches (one answer per many events); needs nats-server 2.14+ and "
        "sets allow_batched on the output stream; falls back to one-by-one publishing when unsupported. An event "
        "refused for good can put the rest of its batch behind later events (docs/performance.md).",
    )


@dataclass(frozen=True)
class DedupSettings:
    ttl: int = setting(300, "Lifetime in seconds of a dedup marker.", gt=0)
    key_prefix: str = setting("dedup:", "Redis key prefix of the markers.")
    mark_timeout: float = setting(0.5, "Longest wait for the marker write before acking anyway.", gt=0)
    claim_ttl: float = setting(
        8.0,
        'Lifetime in seconds of the "in progress" claim taken with the lookup; longer than publish.timeout, '
        "shorter than ingest.ack_wait; 0 turns claims off (lookup only), as ingest.ordering = partitioned does.",
        ge=0,
    )
    routing_ttl: int = setting(
        86400, "Lifetime in seconds of a routing cache entry (routes.<table>.routing_cache).", gt=0
    )
    routing_key_prefix: str = setting("route:", "Redis key prefix of the routing cache.")


@dataclass(frozen=True)
class RedisSettings:
    url: str = setting(
        "redis://127.0.0.1:6379/0",
        "`redis://`, `rediss://` (TLS) or `unix://`; the database is a number (`/0`).",
        url=REDIS_SCHEMES,
    )
    mode: str = setting("standalone", "`standalone` or `cluster` (database 0 only).", choices=("standalone", "cluster"))
    password: str = setting("", "Redis password.", secret=True)
    socket_timeout: float = setting(0.5, "Read and connect timeout.", gt=0)
    retry_interval: float = setting(1.0, "While Redis is degraded, skip it this long after each failure.", gt=0)
    tls_ca_file: str = setting("", "CA bundle for a rediss:// URL.", file=True)


@dataclass(frozen=True)
class DlqSettings:
    enabled: bool = setting(True, "When false, poison messages are only logged, counted and terminated.")
    stream: str = setting("cdc_dlq_stream", "Dead-letter stream.", check=_jetstream_name)
    subject_prefix: str = setting("dlq", "Dead-letter subject is <prefix>.<source subject>.", check=_literal_subject)
    max_age_days: float = setting(14.0, "How long dead letters are kept, when the service creates the stream.", gt=0)
    advisory_stream: str = setting(
        "cdc_max_deliveries",
        "Stream capturing the durable's MAX_DELIVERIES advisories; each such message is dead-lettered.",
        check=_jetstream_name,
    )


@dataclass(frozen=True)
class WorkersSettings:
    pool_size: int = setting(0, "Worker threads; 0 = available CPUs × multiplier, at least min_size.", ge=0)
    multiplier: int = setting(4, "Threads per available CPU when pool_size is 0.", gt=0)
    min_size: int = setting(2, "Fewest threads when pool_size is 0.", gt=0)

    def resolved_pool_size(self, cpu_count: int | None) -> int:
        """``pool_size`` when set, else ``cpu_count * multiplier``, never below ``min_size``."""
        if self.pool_size > 0:
            return self.pool_size
        return max(self.min_size, (cpu_count or 1) * self.multiplier)


@dataclass(frozen=True)
class HttpSettings:
    host: str = setting("0.0.0.0", "Address of the probe and metrics listener.")
    port: int = setting(8080, "Port of the probe and metrics listener.", ge=1, le=65535)
    read_timeout: float = setting(
        5.0, "Seconds a client has to send its request and take the answer; then the connection is closed.", gt=0
    )
    max_connections: int = setting(
        512, "Connections open at once on the probe port; past it new ones are closed unanswered.", gt=0
    )


@dataclass(frozen=True)
class LogSettings:
    level: str = setting("INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL.", check=_log_level)
    format: str = setting(
        "json",
        "`json` (one object per line, for containers) or `console` (one readable line, for a terminal; make run).",
        choices=("json", "console"),
    )
    summary_interval: float = setting(60.0, "Period of the one-line summary log.", gt=0)


@dataclass(frozen=True)
class HealthSettings:
    stall_timeout: float = setting(
        120.0, "Liveness fails when messages are in flight and none was acked for this long.", gt=0
    )
    nats_ping_timeout: float = setting(
        3.0, "Readiness fails when nothing moved this long and nats-server does not answer a ping within it.", gt=0
    )


@dataclass(frozen=True)
class ShutdownSettings:
    grace_seconds: float = setting(20.0, "Bound of the shutdown sequence; keep below the pod's grace period.", gt=0)


DEFAULT_ROUTES: Mapping[str, Mapping[str, str]] = {
    "messages": {"pk": "message_id", "subject": "wa.{company}.{agent_id}.messages.{chat_id}"},
    "chats": {"pk": "chat_id", "subject": "wa.{company}.{agent_id}.chats"},
    "agents": {"pk": "agent_id", "subject": "wa.{company}.{agent_id}.agents"},
}
ROUTE_KEYS = ("pk", "subject", "columns", "routing_cache")

# Whether a route keeps its rows' routing fields in Redis so that a delete carrying only the primary key (a table
# without REPLICA IDENTITY FULL) can still be routed; per route with routes.<table>.routing_cache.
ROUTING_CACHE_DEFAULT = False


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
        default_factory=lambda: {
            t: compile_route(t, r["pk"], r["subject"], routing_cache=ROUTING_CACHE_DEFAULT)
            for t, r in DEFAULT_ROUTES.items()
        }
    )

    @property
    def layout(self) -> SubjectLayout:
        return SubjectLayout(self.ingest.subject_layout)

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with every secret and URL credential replaced by ``***``."""
        out: dict[str, Any] = {}
        for section in _SECTIONS:
            values = getattr(self, section)
            out[section] = {d.name: d.shown(getattr(values, d.name)) for d in _DECLARED[section]}
        out["routes"] = {
            t: {
                "pk": r.pk,
                "subject": r.template,
                **({"columns": sorted(r.columns)} if r.columns else {}),
                "routing_cache": r.routing_cache,
            }
            for t, r in self.routes.items()
        }
        return out


# ---------------------------------------------------------------------------------------------------------------
# What the declarations add up to


@dataclass(frozen=True)
class Declared:
    """One declared setting: ``section.name``, its type, default and rules."""

    section: str
    name: str
    kind: type[Any]  # bool, int, float, str or tuple (of strings)
    default: Any
    rule: Rule

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"

    def shown(self, value: Any) -> Any:
        """``value`` as it may be printed: a set secret is ``***``, URL credentials are masked, tuples are lists."""
        if self.rule.secret:
            return "***" if value else value
        if self.rule.url:
            return [mask_url(u) for u in value] if isinstance(value, tuple) else mask_url(value)
        return list(value) if isinstance(value, tuple) else value


def _declare(section: str, cls: type[Any]) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(cls)
    declared = []
    for item in fields(cls):
        hint = hints[item.name]
        kind = tuple if typing.get_origin(hint) is tuple else hint
        if kind not in (bool, int, float, str, tuple):
            raise TypeError(f"{section}.{item.name}: settings are bool, int, float, str or tuple[str, ...]")
        default = item.default if item.default_factory is MISSING else item.default_factory()
        declared.append(Declared(section, item.name, kind, default, item.metadata.get(_RULE, _UNDECLARED)))
    return tuple(declared)


_SECTIONS: dict[str, type[Any]] = {
    item.name: typing.get_type_hints(Settings)[item.name] for item in fields(Settings) if item.name != "routes"
}
_DECLARED: dict[str, tuple[Declared, ...]] = {name: _declare(name, cls) for name, cls in _SECTIONS.items()}
SECRET_KEYS = frozenset(d.key for ds in _DECLARED.values() for d in ds if d.rule.secret)


def declared_settings() -> Iterator[Declared]:
    """Every declared setting, section by section, in declaration order."""
    for section in _DECLARED.values():
        yield from section


def _rules_text(d: Declared) -> str:
    rule, parts = d.rule, []
    for bound, sign in ((rule.gt, ">"), (rule.ge, "≥"), (rule.le, "≤")):
        if bound is not None:
            parts.append(f"{sign} {bound:g}")
    parts += [f"or {a:g}" for a in rule.allow]
    if rule.choices:
        parts.append(" or ".join(f"`{c}`" for c in rule.choices))
    if rule.url:
        parts.append(f"{'/'.join(rule.url)} URL{'s' if d.kind is tuple else ''}")
    if rule.non_empty:
        parts.append("not empty")
    if rule.file:
        parts.append("existing file")
    if rule.check is not None and rule.check.__doc__:
        parts.append(rule.check.__doc__.strip())
    if rule.secret:
        parts.append("**secret**")
    return ", ".join(parts)


def _default_text(d: Declared) -> str:
    if isinstance(d.default, bool):
        return f"`{str(d.default).lower()}`"
    if isinstance(d.default, tuple):
        return f"`{json.dumps(list(d.default))}`"
    if isinstance(d.default, str):
        return f"`{json.dumps(d.default)}`"
    return f"`{d.default!r}`"


def settings_reference() -> str:
    """The settings reference of ``docs/settings.md`` (Markdown), derived from the declarations."""
    kinds = {bool: "boolean", int: "integer", float: "number", str: "string", tuple: "list of strings"}
    lines: list[str] = []
    for section, declared in _DECLARED.items():
        lines += [f"**`[{section}]`**", "", "| key | type | default | rules | meaning |", "|---|---|---|---|---|"]
        for d in declared:
            doc = d.rule.doc.replace("|", "\\|")
            lines.append(f"| `{d.name}` | {kinds[d.kind]} | {_default_text(d)} | {_rules_text(d)} | {doc} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Masking

_CREDENTIAL_PARAM = re.compile(r"pass|pwd|token|secret|key|auth|credential|signature", re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``: the password of the user info (``user:***@host``), a
    user-only user info of a NATS URL (nats-py sends it as the token: ``nats://***@host``), and the value of each
    query parameter whose name says password, token, secret, key or auth. Works on URLs that do not parse, such as
    one whose password holds ``/``, ``#`` or ``?``: everything up to the last ``@`` counts as user info."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        if colon and not re.search(r"[/?#]", user):
            userinfo = f"{user}:***"
        elif colon or scheme in NATS_SCHEMES or re.search(r"[/?#]", userinfo):
            userinfo = "***"
        rest = f"{userinfo}@{rest}"
    head, question, query = rest.partition("?")
    if not question:
        return f"{scheme}://{rest}"
    query, hash_, fragment = query.partition("#")
    params = []
    for pair in query.split("&"):
        name, equals, _ = pair.partition("=")
        params.append(f"{name}=***" if equals and _CREDENTIAL_PARAM.search(name) else pair)
    return f"{scheme}://{head}?{'&'.join(params)}{hash_}{'***' if fragment else ''}"


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__


def _quoted(d: Declared, value: str) -> str:
    """How an invalid text value appears in an error line: never a secret, URLs masked."""
    if d.rule.secret:
        return "(value not shown: it is a secret)"
    return repr(mask_url(value) if "://" in value else value)


# ---------------------------------------------------------------------------------------------------------------
# Parsing and validation

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _from_text(d: Declared, text: str) -> Any:
    """Parse a text value (an environment variable, or a quoted value in a file) as the setting's type."""
    if d.kind is str:
        return text
    if d.kind is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
        raise ConfigError(f"{d.key}: expected true or false, got {_quoted(d, text)}")
    if d.kind is tuple:
        if text.strip().startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                raise ConfigError(f"{d.key}: expected a JSON list of strings or a comma-separated string") from None
            return _from_data(d, items)
        return tuple(part.strip() for part in text.split(",") if part.strip())
    try:
        number: float = int(text) if d.kind is int else float(text)
    except ValueError:
        kind = "an integer" if d.kind is int else "a number"
        raise ConfigError(f"{d.key}: expected {kind}, got {_quoted(d, text)}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{d.key}: expected a finite number, got {_quoted(d, text)}")
    return number


def _from_data(d: Declared, raw: Any) -> Any:
    """Turn a value read from a file (TOML-typed) into the setting's type; text is parsed as from the environment."""
    if isinstance(raw, str):
        return _from_text(d, raw)
    if d.kind is tuple:
        return _strings_from_data(d, raw)
    if d.kind is str:
        hint = " (write it in quotes)" if isinstance(raw, int | float) and not isinstance(raw, bool) else ""
        raise ConfigError(f"{d.key}: expected a string, got {_kind_name(raw)}{hint}")
    if d.kind is bool:
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"{d.key}: expected true or false, got {_kind_name(raw)}")
    return _number_from_data(d, raw)


def _strings_from_data(d: Declared, raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list | tuple):
        raise ConfigError(f"{d.key}: expected a list of strings, got {_kind_name(raw)}")
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not item:
            what = "an empty string" if item == "" else _kind_name(item)
            raise ConfigError(f"{d.key}[{i}]: expected a non-empty string, got {what}")
    return tuple(raw)


def _number_from_data(d: Declared, raw: Any) -> int | float:
    number = isinstance(raw, int | float) and not isinstance(raw, bool)  # bool is an int to Python, not to TOML
    if d.kind is int and number and isinstance(raw, int):
        return raw
    if d.kind is float and number and math.isfinite(raw):
        return float(raw)
    kind = "an integer" if d.kind is int else "a number"
    raise ConfigError(f"{d.key}: expected {kind}, got {_kind_name(raw)}")


def _check(d: Declared, value: Any, check_files: bool) -> None:
    rule, key = d.rule, d.key
    if d.kind in (int, float) and value not in rule.allow:
        _check_range(d, value)
    _check_choice(d, value)
    if rule.url:
        for i, url in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            _check_url(key if i is None else f"{key}[{i}]", url, rule.url)
    if rule.file and value and check_files and not os.path.isfile(value):
        raise ConfigError(f"{key}: no such file: {value!r}")
    problem = rule.check(value) if rule.check is not None else None
    if problem:
        raise ConfigError(f"{key}: {problem}")


def _check_choice(d: Declared, value: Any) -> None:
    rule, key = d.rule, d.key
    if rule.non_empty and not value:
        raise ConfigError(f"{key}: at least one value is required")
    if rule.choices and value not in rule.choices:
        raise ConfigError(f"{key}: {_quoted(d, value)} is not one of {', '.join(rule.choices)}")


def _check_range(d: Declared, value: float) -> None:
    rule, key = d.rule, d.key
    also = f" (or {', '.join(f'{a:g}' for a in rule.allow)})" if rule.allow else ""
    if rule.gt is not None and not value > rule.gt:
        raise ConfigError(f"{key}: must be greater than {rule.gt:g}{also}, got {value}")
    if rule.ge is not None and not value >= rule.ge:
        raise ConfigError(f"{key}: must be at least {rule.ge:g}{also}, got {value}")
    if rule.le is not None and not value <= rule.le:
        raise ConfigError(f"{key}: must be at most {rule.le:g}{also}, got {value}")


def _check_url(key: str, url: str, schemes: tuple[str, ...]) -> None:
    shown = repr(mask_url(url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # its message can quote part of a password: never show it
        raise ConfigError(
            f"{key}: cannot parse URL {shown}: check the port, and percent-encode '/', '#', '?' or '@' in a password"
        ) from None
    if parts.scheme not in schemes or not (parts.hostname or (parts.scheme == "unix" and parts.path)):
        raise ConfigError(f"{key}: expected a {'/'.join(schemes)} URL with a host, got {shown}")
    if port == 0:
        raise ConfigError(f"{key}: port 0 in {shown}")
    if parts.scheme in ("redis", "rediss", "unix"):
        db = [v for k, v in parse_qsl(parts.query) if k == "db"]
        path = "" if parts.scheme == "unix" else parts.path.strip("/")
        # redis-py reads a path that is not a number, or a bad db parameter, as database 0 without a word.
        if (path and not path.isdigit()) or any(not v.isdigit() for v in db):
            raise ConfigError(f"{key}: the database must be a number (redis://host:6379/0), got {shown}")


def _section(name: str, raw: Any, check_files: bool) -> Any:
    cls = _SECTIONS[name]
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{name}: expected a table of settings, got {_kind_name(raw)}")
    known = {d.name: d for d in _DECLARED[name]}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{name}.{key}: unknown setting; known: {', '.join(known)}")
        values[key] = _from_data(known[key], value)
    for d in _DECLARED[name]:
        _check(d, values.get(d.name, d.default), check_files)
    return cls(**values)


def _check_partitioning(s: Settings) -> None:
    """ingest.ordering = partitioned: the layout names the ordering key and every input pattern can be partitioned."""
    layout = SubjectLayout(s.ingest.subject_layout)  # already checked on its own
    try:
        ordering_key(layout)
    except PartitionError as exc:
        raise ConfigError(f"ingest.subject_layout: {exc}") from None
    for pattern in s.ingest.subjects:
        try:
            partition_transform(pattern, layout, s.ingest.partitions)
        except PartitionError as exc:
            raise ConfigError(f"ingest.subjects: {exc}") from None
    if s.ingest.partition_stream == s.ingest.stream:
        raise ConfigError("ingest.partition_stream: must differ from ingest.stream (it is sourced from it)")


def _cross_check(s: Settings) -> None:
    """Rules that span settings."""

    def require(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{key}: {message}")

    if s.ingest.ordering == "partitioned":
        _check_partitioning(s)

    require(
        not s.redis.tls_ca_file or s.redis.url.startswith("rediss://"),
        "redis.tls_ca_file",
        "is only used with a rediss:// redis.url",
    )
    if s.redis.mode == "cluster":
        parts = urlsplit(s.redis.url)
        require(parts.scheme in ("redis", "rediss"), "redis.url", "must be redis:// or rediss:// in cluster mode")
        require(
            parts.path in ("", "/", "/0") and dict(parse_qsl(parts.query)).get("db", "0") == "0",
            "redis.url",
            "cluster mode has database 0 only: use redis://host:port or redis://host:port/0",
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
    require(
        s.publish.stream_max_age == 0 or s.publish.stream_max_age >= s.publish.duplicate_window,
        "publish.stream_max_age",
        "must be 0 (unlimited) or at least publish.duplicate_window",
    )
    # A claim must outlive one publish attempt, and be gone before AckWait redelivers what a dead replica held.
    require(
        s.dedup.claim_ttl == 0 or s.publish.timeout < s.dedup.claim_ttl < s.ingest.ack_wait,
        "dedup.claim_ttl",
        f"{s.dedup.claim_ttl}s must be 0 (off) or longer than publish.timeout ({s.publish.timeout}s) and shorter "
        f"than ingest.ack_wait ({s.ingest.ack_wait}s)",
    )
    # JetStream only deduplicates inside the window; a retried publish must still land inside it.
    require(
        s.publish.duplicate_window >= s.publish.timeout * 2,
        "publish.duplicate_window",
        f"{s.publish.duplicate_window}s is shorter than two publish timeouts",
    )


def _routes(raw: Any) -> dict[str, Route]:
    return {table: _route(table, spec) for table, spec in _merged_routes(raw).items()}


def _merged_routes(raw: Any) -> dict[str, dict[str, Any]]:
    """The default routes with ``raw`` (the ``routes`` table) laid over them."""
    merged: dict[str, Any] = {t: dict(r) for t, r in DEFAULT_ROUTES.items()}
    if raw is None:
        return merged
    if not isinstance(raw, Mapping):
        raise ConfigError(f"routes: expected a table of tables, got {_kind_name(raw)}")
    # Defaults stay unless a table is redefined; a table can be dropped with routes.<table> = false.
    for table, spec in raw.items():
        if spec is False or (isinstance(spec, str) and spec.strip().lower() in _FALSE):
            merged.pop(table, None)
        elif isinstance(spec, Mapping):
            merged[table] = {**merged.get(table, {}), **spec}
        else:
            raise ConfigError(f"routes.{table}: expected pk and subject, or false, got {_kind_name(spec)}")
    return merged


def _route(table: str, spec: dict[str, Any]) -> Route:
    key = f"routes.{table}"
    unknown = set(spec) - set(ROUTE_KEYS)
    if unknown:
        raise ConfigError(f"{key}.{sorted(unknown)[0]}: unknown setting; known: {', '.join(ROUTE_KEYS)}")
    pk, subject = spec.get("pk"), spec.get("subject")
    routing_cache = _routing_cache(key, spec.get("routing_cache", ROUTING_CACHE_DEFAULT))
    if not isinstance(pk, str) or not pk:
        raise ConfigError(f"{key}.pk: a column name is required")
    if not isinstance(subject, str) or not subject:
        raise ConfigError(f"{key}.subject: a subject template is required")
    columns = _columns(f"{key}.columns", spec.get("columns"))
    try:
        return compile_route(table, pk, subject, columns, routing_cache=routing_cache)
    except RouteError as exc:
        # Name the key that holds the bad value: the table name itself, its columns or its subject template.
        where = key if token_problem(table) else key + (".columns" if "columns" in str(exc) else ".subject")
        raise ConfigError(f"{where}: {exc}") from None


def _routing_cache(key: str, raw: Any) -> bool:
    if isinstance(raw, str) and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE  # from an environment variable
    if not isinstance(raw, bool):
        raise ConfigError(f"{key}.routing_cache: expected true or false, got {_kind_name(raw)}")
    return raw


def _columns(key: str, raw: Any) -> tuple[str, ...] | None:
    """``routes.<table>.columns``: the columns the table's rows are expected to have (schema drift is counted against
    them). A list, or as text a JSON list or a comma-separated string; unset means not checked."""
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text.startswith("["):
            try:
                raw = json.loads(text)
            except ValueError:
                raise ConfigError(f"{key}: expected a JSON list of strings or a comma-separated string") from None
        else:
            raw = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(raw, list | tuple) or not raw or not all(isinstance(c, str) and c for c in raw):
        raise ConfigError(f"{key}: expected a non-empty list of column names")
    return tuple(raw)


def _lower(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k).lower(): _lower(v) for k, v in value.items()}
    return value


def settings_from_mapping(raw: Mapping[str, Any], *, check_files: bool = False) -> Settings:
    """Build and validate ``Settings`` from plain nested data (keys in any case), as merged from all sources.

    ``check_files``: also require that every file a setting names exists (the loader does; tests of the model need
    not create them)."""
    data = _lower(raw)
    unknown = sorted(set(data) - {*_SECTIONS, "routes"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown settings section; known: {', '.join([*_SECTIONS, 'routes'])}")
    sections = {name: _section(name, data.get(name), check_files) for name in _SECTIONS}
    settings = Settings(**sections, routes=_routes(data.get("routes")))
    _cross_check(settings)
    return effective(settings)


def effective(settings: Settings) -> Settings:
    """``settings`` as the service runs them (idempotent): with ``ingest.ordering = partitioned`` there are no Redis
    claims, ``dedup.claim_ttl`` is 0. ``settings_from_mapping`` applies it, so ``config`` shows what runs; the
    ``Service`` applies it too, for settings built in code."""
    if settings.ingest.ordering == "partitioned" and settings.dedup.claim_ttl != 0:
        # The pin gives each partition one owner, and a claim left by an owner that died makes its successor publish
        # that event after newer ones of the same chat (a claimed copy is published outside the receipt order, once
        # the claim expires). docs/system_architecture.md §9.1.
        return replace(settings, dedup=replace(settings.dedup, claim_ttl=0.0))
    return settings


# ---------------------------------------------------------------------------------------------------------------
# Loading: files, then the environment


@dataclass(frozen=True)
class Loaded:
    """The result of ``load``: the settings, the files they came from (in order) and warnings to log."""

    settings: Settings
    files: tuple[str, ...]
    warnings: tuple[str, ...]

    def no_file_notice(self, cwd: str) -> str | None:
        """The one line to log at start-up when no settings file was found, else ``None``."""
        if self.files:
            return None
        return (
            f"no settings file found: none of {', '.join(DEFAULT_FILES)} in {cwd}, no --config and no "
            f"{FILES_VARIABLE}; using the built-in defaults and CDC_* variables"
        )


# Variables Kubernetes creates for each Service of the namespace (enableServiceLinks): <NAME>_SERVICE_HOST,
# <NAME>_SERVICE_PORT[_<PORT NAME>], <NAME>_PORT and <NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]. A Service named
# cdc-<anything> yields CDC_<ANYTHING>_...; a name never ends in '-', so <NAME> never ends in '_' and CDC_HTTP__PORT
# cannot match.
_SERVICE_LINK = re.compile(
    r"[A-Z0-9_]*[A-Z0-9]_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``CDC_<SECTION>__<KEY>`` variables as nested text values. Variables that cannot be settings are ignored:
    those without ``__`` (``CDC_SETTINGS_FILES``, most service links) and the other service-link shapes. Any other
    ``CDC_*__*`` variable must name a setting, so a misspelt section or key stops start-up."""
    data: dict[str, Any] = {}
    prefix = f"{ENV_PREFIX}_"
    for name in sorted(environ):
        if name.startswith(prefix) and "__" in name:
            _environ_setting(data, name, name[len(prefix) :].lower().split("__"), environ[name])
    return data


def _environ_setting(data: dict[str, Any], name: str, parts: list[str], value: str) -> None:
    """Put the variable ``name`` (``parts``: its path, lower case) into ``data``, ignore it as a service link, or
    raise naming what it fails to name."""
    section = parts[0]
    if section in _SECTIONS and len(parts) == 2 and any(d.name == parts[1] for d in _DECLARED[section]):
        data.setdefault(section, {})[parts[1]] = value
    elif section == "routes" and _route_variable(data, parts, value):
        pass
    elif not _SERVICE_LINK.fullmatch(name):
        raise _unknown_variable(name, parts)


def _route_variable(data: dict[str, Any], parts: list[str], value: str) -> bool:
    """``CDC_ROUTES__<TABLE>__<KEY>``, or ``CDC_ROUTES__<TABLE>`` set to false (drops the table): True if taken."""
    if len(parts) == 3 and parts[2] in ROUTE_KEYS and parts[1]:
        route = data.setdefault("routes", {}).setdefault(parts[1], {})
        if isinstance(route, dict):
            route[parts[2]] = value
        return True
    if len(parts) == 2 and parts[1] and value.strip().lower() in _FALSE:
        data.setdefault("routes", {})[parts[1]] = False
        return True
    return False


def _unknown_variable(name: str, parts: list[str]) -> ConfigError:
    section = parts[0]
    if section == "routes":
        return ConfigError(
            f"{'.'.join(parts)}: set {name.split('__', maxsplit=1)[0]}__<TABLE>__PK or __SUBJECT, or <TABLE> to false"
        )
    if section in _SECTIONS:
        return ConfigError(f"{'.'.join(parts)}: unknown setting ({name}); known: {_known(section)}")
    known = ", ".join([*_SECTIONS, "routes"])
    return ConfigError(f"{section}: unknown settings section ({name}); known: {known}")


def _known(section: str) -> str:
    return ", ".join(d.name for d in _DECLARED[section])


def _read_file(path: Path) -> dict[str, Any]:
    """One settings file as nested data with lower-case keys, every value exactly as the file's format gives it.

    dynaconf reads the file: its file loader (``BaseLoader``) opens it and parses it with the parser its loader for
    that format uses (its vendored ``tomllib``, ``json``, its vendored ruamel YAML ``safe_load``), and stores the data
    in a dynaconf ``Settings`` (``_dynaconf_read``). Only that step of dynaconf runs, configured in code: its
    ``settings_files``/``load_file`` path is not used because it always also reads a ``<name>.local.<ext>`` beside the
    file, takes a name with ``[`` for a glob, adds ``SECRETS_FOR_DYNACONF``, ``PRELOAD_``/``INCLUDES_FOR_DYNACONF`` and
    ``dynaconf_include`` files and runs a ``dynaconf_hooks.py`` found beside a file; and its start-up (``Dynaconf()``)
    lets every ``*_FOR_DYNACONF`` variable override the options given in code. Markers (``@json``, ``@format``,
    ``@read_file``, ...) are off (``AUTO_CAST_FOR_DYNACONF`` false), and the file's keys are checked against the
    declarations before dynaconf sees them, so ``dynaconf_merge``, ``dynaconf_dotted_lookup`` or ``dynaconf_include``
    in a file is an unknown key, never an instruction to dynaconf."""
    try:
        raw = path.read_bytes()  # dynaconf only warns about a file it cannot open; say why instead
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the settings file: {exc.strerror}") from None
    try:
        raw.decode("utf-8")  # dynaconf's TOML loader retries other text with the locale's codec; refuse it here
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a valid settings file: not UTF-8 (byte {exc.start})") from None
    try:
        # Imported here: the pure modules never pull dynaconf in. Its import evaluates every *_FOR_DYNACONF variable
        # (dynaconf/default_settings.py, e.g. int(REDIS_PORT_FOR_DYNACONF)) and fails on some values: no option
        # given in code can prevent that, so say so instead of blaming the file.
        import dynaconf.base  # noqa: F401
    except Exception as exc:
        raise ConfigError(
            f"{path}: cannot read the settings file: dynaconf, which reads it, fails to import ({type(exc).__name__}); "
            "it reads the *_FOR_DYNACONF environment variables on import: unset them"
        ) from None
    try:
        return _dynaconf_read(path)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not a valid settings file: {_parse_error(exc)}") from None


# dynaconf's options for reading one file, every one that the file loading path consults, given explicitly: the
# dynaconf Settings below never looks at the environment (no default_loader), so no *_FOR_DYNACONF variable can
# change them.
_DYNACONF_OPTIONS: dict[str, Any] = {
    "AUTO_CAST_FOR_DYNACONF": False,  # no @ markers: strings stay as written
    "ENVIRONMENTS_FOR_DYNACONF": False,  # a [development] table is just a table
    "MAIN_ENV_FOR_DYNACONF": "main",
    "DOTTED_LOOKUP_FOR_DYNACONF": False,  # a key "a.b" is not a path
    "NESTED_SEPARATOR_FOR_DYNACONF": False,  # nor is "a__b"
    "INDEX_SEPARATOR_FOR_DYNACONF": None,
    "MERGE_ENABLED_FOR_DYNACONF": False,  # the layers merge in _merge
    "LOWERCASE_READ_FOR_DYNACONF": True,
    "VALIDATE_ON_UPDATE_FOR_DYNACONF": False,
    "APPLY_DEFAULT_ON_NONE_FOR_DYNACONF": None,
    "SYSENV_FALLBACK_FOR_DYNACONF": False,  # a missing key never falls back to os.environ
    "FRESH_VARS_FOR_DYNACONF": [],
    "ENCODING_FOR_DYNACONF": "utf-8",
    "YAML_LOADER_FOR_DYNACONF": "safe_load",
    "COMMENTJSON_ENABLED_FOR_DYNACONF": False,
    "CORE_LOADERS_FOR_DYNACONF": [],
    "LOADERS_FOR_DYNACONF": [],
    "SETTINGS_FILE_FOR_DYNACONF": [],
    "SECRETS_FOR_DYNACONF": None,
    "INCLUDES_FOR_DYNACONF": [],
    "PRELOAD_FOR_DYNACONF": [],
    "SKIP_FILES_FOR_DYNACONF": [],
    "LOAD_DOTENV_FOR_DYNACONF": False,
    # Settings() runs none of its loaders (default_loader would override every option above from os.environ,
    # settings_loader would add the files and hooks listed in _read_file) nor validators.
    "dynaconf_skip_loaders": True,
    "dynaconf_skip_validators": True,
}


def _dynaconf_read(path: Path) -> dict[str, Any]:
    """The file ``path`` (suffix one of ``FILE_SUFFIXES``, UTF-8) read by dynaconf's ``BaseLoader`` into a dynaconf
    ``Settings``: its keys in lower case, its values exactly as the format gives them. Raises ``ConfigError`` for a
    file that is not a table of known keys; a parser's exception as it is."""
    from dynaconf.base import Settings as DynaconfSettings
    from dynaconf.loaders.base import BaseLoader
    from dynaconf.vendor import tomllib as dynaconf_tomllib
    from dynaconf.vendor.ruamel import yaml

    suffix = path.suffix.lower()
    parser: Callable[[Any], Any]
    if suffix == ".toml":  # what dynaconf's toml_loader reads with (binary, its vendored tomllib)
        parser, opener = dynaconf_tomllib.load, {"mode": "rb"}
    else:  # json_loader and yaml_loader (YAML_LOADER_FOR_DYNACONF = safe_load): text in ENCODING_FOR_DYNACONF
        parser = json.load if suffix == ".json" else yaml.safe_load
        opener = {"mode": "r", "encoding": _DYNACONF_OPTIONS["ENCODING_FOR_DYNACONF"]}
    layer: dict[str, Any] = {}

    def parse(stream: Any) -> Any:
        """dynaconf's parser, then the checks that must come before dynaconf acts on the data."""
        data = parser(stream)
        if data is None:  # an empty YAML file
            return None
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{path}: not a valid settings file: expected a table of sections, got {_kind_name(data)}"
            )
        layer.update({str(k).lower(): _lower(v) for k, v in data.items()})
        _check_names(layer, path)
        return data

    store = DynaconfSettings(**_DYNACONF_OPTIONS)
    # identifier is how dynaconf names the source; extensions: the file's own suffix, so that BaseLoader opens it
    # (with any other name it would parse the path itself as the text of a file).
    loader = BaseLoader(store, "_envless", f"cdc:{suffix[1:]}", (path.suffix,), parse, parse, opener_params=opener)
    loader.load(filename=[str(path)], silent=False)  # a list: a string would be split at commas
    read = {str(k).lower(): v for k, v in store.as_dict().items()}
    return {key: _lower(read[key]) for key in layer}


def _parse_error(exc: Exception) -> str:
    """Where a file failed to parse, without quoting its text (it may hold a secret)."""
    if type(exc).__name__ == "TOMLDecodeError":  # dynaconf's vendored tomllib: its own class, the stdlib's messages
        return str(exc)  # "Invalid value (at line 2, column 7)"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (at line {exc.lineno}, column {exc.colno})"
    mark = getattr(exc, "problem_mark", None)  # a YAML error; its str() quotes the lines around the problem
    if mark is not None:
        return f"{type(exc).__name__} (at line {mark.line + 1}, column {mark.column + 1})"
    return type(exc).__name__


def _check_names(layer: Mapping[str, Any], path: Path) -> None:
    """Refuse a key of the file ``path`` (read into ``layer``) that names no setting, naming the key and the file:
    once the files are merged, nothing tells which one a key came from."""
    where = f"(in {path})"
    sections = [*_SECTIONS, "routes"]
    unknown = sorted(set(layer) - set(sections))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown settings section {where}; known: {', '.join(sections)}")
    for section, values in layer.items():
        if not isinstance(values, Mapping):
            continue  # not a table: a value error, reported with the value's type
        if section == "routes":
            for table, spec in values.items():
                extra = sorted(set(spec) - set(ROUTE_KEYS)) if isinstance(spec, Mapping) else []
                if extra:
                    raise ConfigError(
                        f"routes.{table}.{extra[0]}: unknown setting {where}; known: {', '.join(ROUTE_KEYS)}"
                    )
            continue
        extra = [key for key in values if all(d.name != key for d in _DECLARED[section])]
        if extra:
            raise ConfigError(f"{section}.{extra[0]}: unknown setting {where}; known: {_known(section)}")


def _merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    """Deep-merge ``layer`` into ``into``: tables merge key by key, any other value (lists too) replaces."""
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = _lower(value) if isinstance(value, Mapping) else value


def _listed(environ: Mapping[str, str], variable: str) -> list[str]:
    return [name.strip() for name in environ.get(variable, "").split(",") if name.strip()]


def _files_variable(environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """The variable that names the settings files, and its list.

    ``CDC_SETTINGS_FILES``, or ``SETTINGS_FILES_FOR_DYNACONF``: its older name, which the Helm chart sets because
    images built before ``CDC_SETTINGS_FILES`` existed (also version 0.1.0) read only that one, and stop on
    ``CDC_SETTINGS_FILES`` as an unknown settings section. Both set to lists that name different files is refused:
    either could be the one meant. Both naming the same files is one list, read once."""
    current, older = _listed(environ, FILES_VARIABLE), _listed(environ, LEGACY_FILES_VARIABLE)
    if current and older and [_absolute(name) for name in current] != [_absolute(name) for name in older]:
        raise ConfigError(
            f"{FILES_VARIABLE}: names other settings files ({', '.join(current)}) than {LEGACY_FILES_VARIABLE} "
            f"({', '.join(older)}), its older name: set only one of them, or both to the same list"
        )
    return (FILES_VARIABLE, current) if current or not older else (LEGACY_FILES_VARIABLE, older)


def _absolute(name: str) -> Path:
    return Path(name).expanduser().absolute()


def _named_files(config_files: Sequence[str | os.PathLike[str]], environ: Mapping[str, str]) -> list[Path]:
    variable, listed = _files_variable(environ)
    named = [(variable, name) for name in listed]
    named += [("--config", os.fspath(f)) for f in config_files]
    paths = []
    for source, name in named:
        path = _absolute(name)
        if not path.is_file():
            raise ConfigError(f"{source}: no such settings file: {name}")
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise ConfigError(f"{source}: {name}: settings files are {', '.join(FILE_SUFFIXES)}")
        paths.append(path)
    return paths


def load(config_files: Sequence[str | os.PathLike[str]] = (), environ: Mapping[str, str] | None = None) -> Loaded:
    """Load the layered settings (see the module docstring); raise ``ConfigError`` on a bad value or file.

    ``config_files`` are the ``--config`` files; ``environ`` defaults to ``os.environ``."""
    environ = os.environ if environ is None else environ
    cwd = Path.cwd()
    paths = [cwd / name for name in DEFAULT_FILES if (cwd / name).is_file()]
    paths += _named_files(config_files, environ)
    data: dict[str, Any] = {}
    warnings: list[str] = []
    origins: dict[str, str] = {}
    for path in paths:
        layer = _read_file(path)  # its keys already checked (_check_names)
        if "secret" not in path.name.lower():
            for key in sorted(SECRET_KEYS):
                section, name = key.split(".")
                value = layer.get(section, {}).get(name) if isinstance(layer.get(section), Mapping) else None
                if value:
                    warnings.append(
                        f"{key} is set in {path}: keep credentials in .secrets.toml or CDC_* variables, not in a "
                        "settings file that is committed or shared"
                    )
        _merge(data, layer)
        _note_origins(origins, layer, f"set in {path}")
    _merge(data, _from_environ(environ))
    for name in environ:
        if name.startswith(f"{ENV_PREFIX}_") and "__" in name:
            origins[".".join(name[len(ENV_PREFIX) + 1 :].lower().split("__"))] = f"set by {name}"
    try:
        settings = settings_from_mapping(data, check_files=True)
    except ConfigError as exc:
        raise ConfigError(_with_origin(str(exc), origins)) from None
    return Loaded(settings, tuple(str(p) for p in paths), tuple(warnings))


def _note_origins(origins: dict[str, str], layer: Mapping[str, Any], where: str, prefix: str = "") -> None:
    """Remember, per dotted key (lower case), the source that set it last: a bad value's error names it."""
    for key, value in layer.items():
        dotted = f"{prefix}{str(key).lower()}"
        origins[dotted] = where
        if isinstance(value, Mapping):
            _note_origins(origins, value, where, f"{dotted}.")


_ERROR_KEY = re.compile(r"([a-z0-9_]+(?:\.[^\s:\[]+)+)[\[:]")


def _with_origin(message: str, origins: Mapping[str, str]) -> str:
    """``message`` (``<key>: problem``) with the file or variable the key's value came from; as it is for a default."""
    match = _ERROR_KEY.match(message)
    origin = origins.get(match.group(1)) if match else None
    return f"{message} ({origin})" if origin else message


def load_settings(
    config_files: Sequence[str | os.PathLike[str]] = (), environ: Mapping[str, str] | None = None
) -> Settings:
    """``load(...).settings``: the effective settings, or ``ConfigError``."""
    return load(config_files, environ).settings
