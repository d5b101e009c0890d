"""NATS JetStream: connection, stream and consumer provisioning, pipelined publishing, intake.

Everything here runs on the loop thread; nats-py is not thread-safe.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from nats.nuid import NUID

from cdc_service.adapters.nats_wire import Delivery, Route, WireParser, headers_of, send_command
from cdc_service.config import IngestSettings, NatsSettings, Settings, mask_url
from cdc_service.core.subjects import captured_by, covers
from cdc_service.pipeline.common import about
from cdc_service.ports import PubAck, PublishRejected, PushSink

log = logging.getLogger("cdc_service.nats")

STREAM_NAME_IN_USE = 10058


class ProvisioningError(RuntimeError):
    """A stream or consumer cannot be created or brought in line with the settings; the message says how to fix it."""


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect``: reconnect forever, detect dead links in seconds, auth and TLS."""
    options: dict[str, Any] = {
        "servers": list(settings.url),
        "name": settings.name,
        "connect_timeout": settings.connect_timeout,
        "reconnect_time_wait": settings.reconnect_wait,
        "max_reconnect_attempts": -1,
        "ping_interval": settings.ping_interval,
        "max_outstanding_pings": settings.max_outstanding_pings,
        # Room for acks and publishes while reconnecting; past it publish raises and the batch is retried.
        "pending_size": settings.pending_size_mb * 1024 * 1024,
        "allow_reconnect": True,
        # Every subject we publish to is built from tokens checked by core.subjects.token_problem (no whitespace
        # or control characters, so no CRLF injection), or is a reply subject the server gave us: nats-py's
        # per-publish re-validation (publishes and acks alike) would only cost time on the hot path.
        "skip_subject_validation": True,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password
    if settings.token:
        options["token"] = settings.token
    if settings.creds_file:
        options["user_credentials"] = settings.creds_file
    if settings.nkey_seed_file:
        options["nkeys_seed"] = settings.nkey_seed_file
    if settings.tls_ca_file or settings.tls_cert_file:
        context = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
        options["tls"] = context
    return options


def describe_error(exc: BaseException, connect_timeout: float) -> str:
    """``Type: text`` for a log line; an exception without text (a black-holed host's ``TimeoutError``) says what
    it means instead of leaving ``TimeoutError: ``."""
    text = str(exc).strip()
    if text:
        return f"{type(exc).__name__}: {text}"[:300]
    if isinstance(exc, TimeoutError):
        return f"TimeoutError: no answer within nats.connect_timeout ({connect_timeout:g}s)"
    return type(exc).__name__


class ConnectionState:
    """What the NATS connection is doing, for the log and ``/readyz``: written on the loop thread, read by probes.

    nats-py reports each failed (re)connect attempt through ``error_cb`` without saying which server or which
    attempt; this counts attempts since the last success and names the server whose attempt count moved.
    """

    def __init__(self, settings: NatsSettings) -> None:
        self._settings = settings
        self._client: Client | None = None
        self._counts: dict[str, int] = {}
        self.connected = False
        self.attempt = 0  # failed attempts since the last successful connection
        self.url = mask_url(settings.url[0]) if len(settings.url) == 1 else ""
        self.error = ""

    def describe(self) -> str:
        """One phrase for ``/readyz``: the server and the last failure while not connected."""
        servers = self.url or ", ".join(mask_url(u) for u in self._settings.url)
        if self.connected:
            return f"connected to NATS at {servers}"
        if not self.attempt:
            return f"connecting to NATS at {servers}"
        return f"cannot connect to NATS at {servers} (attempt {self.attempt}: {self.error})"

    def _failed_server(self) -> str:
        client = self._client
        if client is None or len(self._settings.url) == 1:
            return self.url
        moved = ""
        for server in client.server_pool:
            uri = server.uri.geturl()
            if server.reconnects > self._counts.get(uri, 0):
                moved = mask_url(uri)
            self._counts[uri] = server.reconnects
        return moved or ", ".join(mask_url(u) for u in self._settings.url)

    def on_error(self, exc: Exception) -> None:
        """An error from nats-py: while not connected it is a failed attempt, logged with server, count and wait."""
        error = describe_error(exc, self._settings.connect_timeout)
        if self.connected:  # until nats-py reports the disconnect, an error is about the live connection
            log.warning("nats error", extra={"error": error})
            return
        self.attempt += 1
        self.error = error
        self.url = self._failed_server()
        wait = self._settings.reconnect_wait
        log.warning(
            "cannot connect to NATS at %s (attempt %d, %s); next attempt in %gs",
            self.url,
            self.attempt,
            error,
            wait,
            extra={"nats_url": self.url, "attempt": self.attempt, "error": error, "next_attempt_in": wait},
        )

    def on_connected(self, client: Client) -> None:
        self._client = client
        self.connected = True
        self.attempt = 0
        self.error = ""
        url = client.connected_url
        self.url = mask_url(url.geturl()) if url is not None else self.url

    def on_disconnected(self) -> None:
        self.connected = False


class _Client(Client):
    """nats-py's client with two changes on the receive side.

    Routes (``route``): the busiest subscriptions (deliveries, PubAcks) take their messages as raw bytes straight from
    the parser (``adapters/nats_wire.py``), in wire order, without nats-py's per-message objects, queue and task.

    Subjects that are not valid UTF-8 are read instead of killing the client: nats-py decodes each delivered subject
    strictly inside its read loop; one message stored under a subject with a byte like 0xff (nats-server accepts and
    stores it) raises there and ends the read loop for good, silently: nothing more is received or acked until the
    ping check reconnects. Decoding with ``surrogateescape`` keeps the bad bytes as lone surrogates
    (``core.subjects.subject_bytes`` turns them back), so the message reaches the engine, which dead-letters it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[int, Route] = {}
        self._ps = WireParser(self)

    def route(self, sid: int, route: Route) -> None:
        """Hand the messages of subscription ``sid`` to ``route`` (until the subscription ends). A route must not
        raise: it runs inside the read loop."""
        self.routes[sid] = route

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> None:
        # nats-py's own parser still dispatches what WireParser leaves to it (a message split across reads).
        route = self.routes.get(sid)
        if route is not None and route(subject, reply, data, headers):
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            return
        await super()._process_msg(sid, subject, reply, data, headers)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self.routes.pop(sid, None)
        super()._remove_sub(sid, max_msgs)

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        if reply.startswith(b"$JS.ACK."):
            return _JetStreamMsg(
                subject=subject.decode("utf-8", "surrogateescape"),
                reply=reply.decode("utf-8", "surrogateescape"),
                data=data,
                headers=headers,
                _client=self,
                _sid=sid,
                _ack=b"PUB " + reply + b" 0\r\n\r\n",
            )
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


@dataclass
class _JetStreamMsg(Msg):
    """A JetStream delivery whose ``ack`` writes its ready-made protocol command: the same bytes and checks as
    nats-py's ``Msg.ack`` (an empty publish to the reply subject, once), without its generic publish path, which was
    the larger part of the ack's cost on the loop thread. ``nak``, ``term`` and ``in_progress`` are nats-py's."""

    _ack: bytes = b""

    async def ack(self) -> None:
        if self._ackd:
            raise MsgAlreadyAckdError(self)
        await send_command(self._client, self._ack)
        self._ackd = True


def read_loop_stopped(nc: Client) -> bool:
    """True when the connection counts as connected but nats-py's read loop has ended.

    nats-py ends its read loop on any unexpected exception and logs it, but keeps the connection's status: without
    this check the service would look healthy and receive nothing until the ping check notices (minutes).
    """
    task = getattr(nc, "_reading_task", None)
    return bool(nc.is_connected and task is not None and task.done())


async def restart_reading(nc: Client) -> None:
    """Reconnect, which starts a new read loop; what was received and not acked is redelivered after AckWait."""
    # nats-py's own path for a protocol error on the read side: disconnect, reconnect, resubscribe.
    await nc._process_op_err(nats.errors.ProtocolError())


async def connect(
    settings: NatsSettings,
    *,
    on_disconnected: Callable[[], Awaitable[None]],
    on_reconnected: Callable[[], Awaitable[None]],
    on_closed: Callable[[], Awaitable[None]],
    state: ConnectionState | None = None,
) -> Client:
    """Connect, retrying forever; ``state`` (when given) follows every attempt."""
    state = state or ConnectionState(settings)
    client = _Client()
    state._client = client

    async def error_cb(exc: Exception) -> None:
        state.on_error(exc)

    async def disconnected_cb() -> None:
        state.on_disconnected()
        await on_disconnected()

    async def reconnected_cb() -> None:
        state.on_connected(client)
        await on_reconnected()

    try:
        await client.connect(
            **connect_options(settings),
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            closed_cb=on_closed,
        )
    except Exception as exc:
        servers = ", ".join(mask_url(u) for u in settings.url)
        raise ConnectionError(
            f"cannot connect to NATS at {servers}: {describe_error(exc, settings.connect_timeout)}"
        ) from None
    state.on_connected(client)
    return client


# ---------------------------------------------------------------------------------------------------------------
# Provisioning


async def ensure_stream(
    js: JetStreamContext,
    name: str,
    subjects: list[str],
    *,
    replicas: int,
    duplicate_window: float | None = None,
    **create_only: Any,
) -> None:
    """Create the stream, or make an existing one fit the settings without taking anything away from it.

    On an existing stream: subjects it lacks are added (others are kept), and ``duplicate_window`` is raised to at
    least the setting. Replicas, limits and storage are create-time only: an operator's choices on a shared stream
    are never undone by a replica starting up; a differing replica count is logged.
    """
    info = await _stream_info_or_create(js, name, subjects, replicas, duplicate_window, create_only)
    if info is None:
        return
    current = info.config
    changed = []
    # A subject an existing one already captures (the settings' cdc.*.* on a stream made with cdc.>) is not missing:
    # adding it would overlap, which JetStream refuses.
    missing = [s for s in subjects if not captured_by(s, current.subjects or [])]
    if missing:
        current.subjects = [*(current.subjects or []), *missing]
        changed.append("subjects")
    if duplicate_window is not None and (current.duplicate_window or 0) < duplicate_window:
        # JetStream only drops a repeated Nats-Msg-Id inside this window; a shorter one weakens exactly-once.
        current.duplicate_window = duplicate_window
        changed.append("duplicate_window")
    if current.num_replicas not in (None, replicas):
        log.warning(
            "stream replicas differ from the settings; left as they are",
            extra={"stream": name, "replicas": current.num_replicas, "configured": replicas},
        )
    if not changed:
        return
    try:
        await js.update_stream(current)
    except BadRequestError as exc:
        raise ProvisioningError(f"cannot update stream {name} ({', '.join(changed)}): {exc.description}") from None
    log.info("stream updated", extra={"stream": name, "changed": changed})


async def _stream_info_or_create(
    js: JetStreamContext,
    name: str,
    subjects: list[str],
    replicas: int,
    duplicate_window: float | None,
    create_only: dict[str, Any],
) -> Any:
    """The existing stream's info, or None after creating it (info again if another replica created it first)."""
    try:
        return await js.stream_info(name)
    except NotFoundError:
        pass
    config = StreamConfig(name=name, subjects=subjects, num_replicas=replicas, storage=StorageType.FILE, **create_only)
    if duplicate_window is not None:
        config.duplicate_window = duplicate_window
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:  # another replica won the race: fall through to the update
            raise ProvisioningError(f"cannot create stream {name}: {exc.description}") from None
        return await js.stream_info(name)
    log.info("stream created", extra={"stream": name, "subjects": subjects, "replicas": replicas})
    return None


def consumer_config(ingest: IngestSettings, stream_subjects: Sequence[str] | None = None) -> ConsumerConfig:
    """The durable consumer the settings describe. Push: a queue group on a fixed deliver subject.

    nats-server stores a message published to a subject with a literal wildcard token (``cdc.>.messages`` is
    captured by the stream's ``cdc.*.*``), but a consumer filter with ``*`` skips it on live delivery without a
    trace. When ``ingest.subjects`` take everything the stream holds (``stream_subjects`` is a subset), the filter is
    widened with ``>`` (``cdc.*.*`` becomes ``cdc.>``): it selects the same stored messages, those included. (Not
    "no filter": nats-server 2.15 stops delivering to a durable whose filter is removed by an update.)
    """
    subjects = list(ingest.subjects)
    if stream_subjects and set(stream_subjects) <= set(subjects):
        subjects = widened_filters(subjects)
    config = ConsumerConfig(
        durable_name=ingest.durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ingest.ack_wait,
        max_deliver=ingest.max_deliver,
        max_ack_pending=ingest.max_ack_pending,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=subjects[0] if len(subjects) == 1 else None,  # an update with neither removes the filter
        filter_subjects=subjects if len(subjects) > 1 else None,
    )
    if ingest.mode == "push":
        # A fixed deliver subject: when each replica invents its own inbox, concurrent start-ups move the consumer
        # to one inbox and the other replica silently receives nothing. No flow control or idle heartbeats: the
        # server sends those to one random queue member.
        config.deliver_subject = ingest.deliver_subject
        config.deliver_group = ingest.queue_group
    else:
        config.max_waiting = 512
    return config


def _filters(config: ConsumerConfig) -> list[str]:
    return sorted(config.filter_subjects or ([config.filter_subject] if config.filter_subject else []))


def consumer_drift(expected: ConsumerConfig, actual: ConsumerConfig) -> list[str]:
    """The fields (names as in ``metrics.DRIFT_FIELDS``) in which the server's durable differs from ``expected``."""
    drift = []
    wanted, found = _filters(expected), _filters(actual)
    # Provisioning widens the filter with ">" when it covers the whole stream (see consumer_config): both spellings
    # are the configured filter, not drift.
    if found != wanted and found != widened_filters(wanted):
        drift.append("filter_subjects")
    if abs(float(expected.ack_wait or 0) - float(actual.ack_wait or 0)) > 0.001:
        drift.append("ack_wait")
    for name in ("max_deliver", "max_ack_pending", "ack_policy"):
        if getattr(expected, name) != getattr(actual, name):
            drift.append(name)
    if (expected.deliver_subject, expected.deliver_group) != (actual.deliver_subject, actual.deliver_group):
        drift.append("deliver_subject")
    return drift


def widened_filters(subjects: Sequence[str]) -> list[str]:
    """Each subject cut at its first wildcard token and ended with ``>``; overlaps removed (a consumer's filters
    must not overlap). Literal subjects stay as they are."""
    widened: set[str] = set()
    for subject in subjects:
        tokens = subject.split(".")
        cut = next((i for i, t in enumerate(tokens) if t in ("*", ">")), None)
        widened.add(subject if cut is None else ".".join([*tokens[:cut], ">"]))
    return sorted(s for s in widened if not any(o != s and covers(o, s.split(".")) for o in widened))


async def ensure_consumer(
    js: JetStreamContext, ingest: IngestSettings, *, resume_after: int | None = None
) -> ConsumerConfig:
    """Create or update the durable; ``add_consumer`` is create-or-update for editable fields.

    An existing consumer keeps where it starts (deliver policy and start sequence cannot be updated, and a consumer
    recreated to resume mid-stream must stay valid for every later start-up). ``resume_after`` creates it to
    deliver from the stream sequence after that one instead of from the stream's start.
    """
    try:
        stream_subjects = (await js.stream_info(ingest.stream)).config.subjects
    except NotFoundError:
        stream_subjects = None  # add_consumer below reports the missing stream
    config = consumer_config(ingest, stream_subjects)
    try:
        existing = (await js.consumer_info(ingest.stream, ingest.durable)).config
    except NotFoundError:
        existing = None
    if existing is not None:
        config.deliver_policy = existing.deliver_policy
        config.opt_start_seq = existing.opt_start_seq
        config.opt_start_time = existing.opt_start_time
    elif resume_after is not None and resume_after > 0:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = resume_after + 1
    try:
        await js.add_consumer(ingest.stream, config)
    except BadRequestError as exc:
        hint = ""
        if ingest.mode == "pull":
            hint = " A push consumer cannot become pull: set ingest.durable to a new name for pull mode."
        raise ProvisioningError(
            f"cannot create or update consumer {ingest.durable} on {ingest.stream}: {exc.description}.{hint}"
        ) from None
    return config


async def provision(js: JetStreamContext, settings: Settings) -> ConsumerConfig:
    """Streams (input, output, dead-letter) and the durable consumer, created or updated."""
    ingest, publish, dlq = settings.ingest, settings.publish, settings.dlq
    await ensure_stream(
        js, ingest.stream, list(ingest.subjects), replicas=ingest.stream_replicas, max_age=ingest.stream_max_age
    )
    await ensure_stream(
        js,
        publish.stream,
        list(publish.subjects),
        replicas=publish.stream_replicas,
        duplicate_window=publish.duplicate_window,
        max_age=publish.stream_max_age,
    )
    if dlq.enabled:
        await ensure_stream(
            js,
            dlq.stream,
            [f"{dlq.subject_prefix}.>"],
            replicas=publish.stream_replicas,
            max_age=dlq.max_age_days * 86400,
            discard=DiscardPolicy.OLD,
        )
        await ensure_advisory_capture(js, settings)
    if settings.ingest.ordering == "partitioned":
        # One pinned durable per partition instead (adapters/nats_partitions.py); a shared durable would only pile up.
        return consumer_config(settings.ingest)
    return await ensure_consumer(js, settings.ingest)


def advisory_subject(stream: str, durable: str) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}"


def advisory_subjects(ingest: IngestSettings) -> list[str]:
    """The max-deliveries advisories of the durables the service pulls: the shared one, or in partitioned mode one
    per partition (``<durable>_p<i>`` on the partitioned stream, ``adapters/nats_partitions.durable_name``)."""
    if ingest.ordering == "partitioned":
        return [advisory_subject(ingest.partition_stream, f"{ingest.durable}_p{p}") for p in range(ingest.partitions)]
    return [advisory_subject(ingest.stream, ingest.durable)]


def advisory_durable(durable: str) -> str:
    return f"{durable}_max_deliveries"


async def ensure_advisory_capture(js: JetStreamContext, settings: Settings) -> None:
    """The stream that keeps the durables' max-deliveries advisories (``advisory_subjects``), and the shared pull
    durable that reads it.

    A stream, not a core subscription: JetStream publishes an advisory once, when the message runs out of
    deliveries, and it must not be lost when no replica is listening at that moment (all restarting, OOM-killed).
    See ``cdc_service.advisories``.
    """
    ingest, dlq = settings.ingest, settings.dlq
    await ensure_stream(
        js,
        dlq.advisory_stream,
        advisory_subjects(ingest),
        replicas=settings.publish.stream_replicas,
        max_age=dlq.max_age_days * 86400,
        discard=DiscardPolicy.OLD,
    )
    config = ConsumerConfig(
        durable_name=advisory_durable(ingest.durable),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_deliver=-1,  # an advisory is the last trace of its message: retry it until it is handled
        max_ack_pending=1000,
        deliver_policy=DeliverPolicy.ALL,
    )
    try:
        await js.add_consumer(dlq.advisory_stream, config)
    except BadRequestError as exc:
        raise ProvisioningError(
            f"cannot create or update consumer {config.durable_name} on {dlq.advisory_stream}: {exc.description}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# Publishing


_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's rule for a header name
_SAFE_KEYS: set[str] = set()  # header names seen to pass it (a handful: ours, and the dead-letter ones)


def _command(subject: str, reply: str, payload: bytes, headers: Mapping[str, str]) -> bytes | None:
    """The HPUB protocol command nats-py would build for this publish, or None where nats-py must do it (a header
    name outside the safe set, a value with a line break, which nats-py rewrites or refuses)."""
    for key in headers:
        if key not in _SAFE_KEYS:
            if not _HEADER_KEY.fullmatch(key) or len(_SAFE_KEYS) >= 64:
                return None
            _SAFE_KEYS.add(key)
    block = "NATS/1.0\r\n" + "".join([f"{k}: {v.strip()}\r\n" for k, v in headers.items()]) + "\r\n"
    if block.count("\n") != len(headers) + 2:
        return None
    # One encode of the whole command line and block; where all of it is ASCII (always, for events) a character is
    # a byte, so the lengths can be taken before encoding.
    text = f"HPUB {subject} {reply} {len(block)} {len(block) + len(payload)}\r\n{block}"
    if text.isascii():
        return text.encode() + payload + b"\r\n"
    head = block.encode()
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(head),
        len(head) + len(payload),
        head,
        payload,
    )


async def send_publish(nc: Client, subject: str, reply: str, payload: bytes, headers: Mapping[str, str]) -> None:
    """``nc.publish(subject, payload, reply=reply, headers=headers)`` with the same checks and bytes on the wire, at a
    quarter of nats-py's cost of building the command (its per-header regex and encodes were ~12 % of the loop
    thread while draining). Raises what ``nc.publish`` raises; uses nats-py internals (``_send_command``, the flusher
    queue), which its own publish uses the same way."""
    command = _command(subject, reply, payload, headers) if headers else None
    if command is None or subject == "":
        await nc.publish(subject, payload, reply=reply, headers=dict(headers) if headers else None)
        return
    await send_command(nc, command, len(payload))


class NoStreamResponse(PublishRejected):
    """No stream captured the subject, or JetStream is unavailable (status 503)."""


class PipelinedPublisher:
    """``Publisher`` that writes publishes back to back and matches PubAcks through one wildcard inbox.

    This is ``js.publish_async`` without its two pitfalls: every server error, including a 503 status, resolves the
    future, and there is no hidden semaphore. Callers bound every wait with a timeout.
    """

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = f"_CDC_PUBACK.{NUID().next().decode()}."
        self._futures: dict[str, asyncio.Future[PubAck]] = {}
        self._detailed: set[str] = set()  # tokens whose PubAck is read in full (stream and sequence)
        self._tokens = itertools.count(1)
        self._sub: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        if isinstance(self._nc, _Client):
            self._nc.route(self._sub._id, self._on_raw_reply)

    @property
    def pending(self) -> int:
        return len(self._futures)

    @property
    def max_payload(self) -> int:
        return int(self._nc.max_payload)

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, detailed: bool = False
    ) -> asyncio.Future[PubAck]:
        token = str(next(self._tokens))
        loop = self._loop
        if loop is None:
            # Looked up once: asyncio.get_running_loop() makes a getpid() system call on every call (CPython 3.11's
            # fork check), about 0.4 us here, twice the cost of the future itself.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[PubAck] = loop.create_future()
        self._futures[token] = future
        if detailed:
            self._detailed.add(token)
        try:
            await send_publish(self._nc, subject, self._prefix + token, payload, headers)
        except Exception as exc:  # closed, draining, buffer full while reconnecting: the caller retries
            self._futures.pop(token, None)
            future.set_exception(PublishRejected(f"{type(exc).__name__}: {exc}"))
        return future

    def sweep(self) -> None:
        for token in [t for t, f in self._futures.items() if f.done()]:
            del self._futures[token]
            self._detailed.discard(token)

    async def _on_reply(self, msg: Msg) -> None:
        future = self._answer(msg.subject[len(self._prefix) :], msg.data, bool(msg.headers))
        if future is not None:
            _settle_from_reply(future, msg.data, msg.headers)

    def _on_raw_reply(self, subject: bytes, reply: bytes, data: bytes, block: bytes | None) -> bool:
        """The route of the PubAck inbox (``nats_wire``): the same as ``_on_reply``, from the raw parts."""
        future = self._answer(subject[len(self._prefix) :].decode("ascii", "replace"), data, block is not None)
        if future is not None:
            _settle_from_reply(future, data, headers_of(block))
        return True

    def _answer(self, token: str, data: bytes, has_headers: bool) -> asyncio.Future[PubAck] | None:
        """Resolve the publish of ``token`` when its reply is the common one; the future when the reply must be read in
        full; None for an unknown or late reply."""
        future = self._futures.pop(token, None)
        if future is None or future.done():
            return None
        detailed = bool(self._detailed) and token in self._detailed
        if detailed:
            self._detailed.discard(token)
        elif not has_headers and b'"error"' not in data and data.startswith(b'{"stream"'):
            # The common case, read without a JSON parse: one reply per published event.
            duplicate = b'"duplicate": true' in data or b'"duplicate":true' in data  # the server writes the former
            future.set_result(_DUPLICATE if duplicate else _STORED)
            return None
        return future


def _settle_from_reply(future: asyncio.Future[PubAck], data: bytes, headers: Mapping[str, str] | None) -> None:
    """Resolve ``future`` from a PubAck read in full: a 503 status, an error, or the stream and sequence."""
    if headers and headers.get("Status") == "503":
        future.set_exception(NoStreamResponse("no stream answered the publish (503)"))
        return
    try:
        reply = orjson.loads(data)
    except orjson.JSONDecodeError:
        future.set_exception(PublishRejected(f"unreadable PubAck {data[:100]!r}"))
        return
    error = reply.get("error") if isinstance(reply, dict) else {"description": "not a JSON object"}
    if error:
        future.set_exception(rejection(error))
        return
    try:
        ack = PubAck(str(reply.get("stream", "")), int(reply.get("seq", 0)), bool(reply.get("duplicate")))
    except (TypeError, ValueError):  # runs inside the read loop (a route): nothing may escape
        future.set_exception(PublishRejected(f"unreadable PubAck {data[:100]!r}"))
        return
    future.set_result(ack)


def rejection(error: Any) -> PublishRejected:
    """The ``PublishRejected`` for a JetStream API error object (``{"code", "err_code", "description"}``)."""
    if not isinstance(error, dict):
        return PublishRejected(f"rejected: {error!r}"[:300])
    code = error.get("err_code")
    return PublishRejected(
        f"{error.get('description', 'rejected')} (code {code if code is not None else '?'})",
        code if isinstance(code, int) else None,
    )


_STORED = PubAck("", 0, False)
_DUPLICATE = PubAck("", 0, True)


# ---------------------------------------------------------------------------------------------------------------
# Intake


class PushIntake:
    """Bind to the durable push consumer as a member of its queue group and hand each delivery to the sink.

    Deliveries are taken by a route (``nats_wire``) straight from the parser, in arrival order. While the sink says
    there is no room, what arrives waits here, in order, up to ``max(64, ingest.max_inflight_mb)`` MiB; past that a
    delivery is dropped unacked (JetStream redelivers it after AckWait, one delivery spent), as nats-py's own
    subscription queue does with the same bound.
    """

    def __init__(self, js: JetStreamContext, settings: IngestSettings, config: ConsumerConfig) -> None:
        self._js = js
        self._settings = settings
        self._config = config
        self._sub: Any = None
        self._nc: Client | None = None  # with _sid: the subscription routed to _on_raw
        self._sid = 0
        self._sink: PushSink | None = None
        self._held: deque[Any] | None = None  # arrivals while waiting for room, oldest first; None: not waiting
        self._held_bytes = 0
        self._held_limit = max(64, settings.max_inflight_mb) * 1024 * 1024
        self._dropped = 0
        self._resuming: asyncio.Task[None] | None = None

    async def start(self, sink: PushSink) -> None:
        self._sink = sink
        # manual_ack: without it nats-py acks as soon as the callback returns, before the work is done.
        self._sub = await self._js.subscribe_bind(
            stream=self._settings.stream,
            consumer=self._settings.durable,
            config=self._config,
            cb=self._on_message,
            manual_ack=True,
            pending_msgs_limit=max(65536, self._settings.max_ack_pending * 2),
            pending_bytes_limit=self._held_limit,
        )
        nc = self._js._nc
        if isinstance(nc, _Client):
            self._nc, self._sid = nc, self._sub._id
            nc.route(self._sid, self._on_raw)

    @property
    def active(self) -> bool:
        return self._sub is not None

    def _on_raw(self, subject: bytes, reply: bytes, data: bytes, block: bytes | None) -> bool:
        if not reply.startswith(b"$JS.ACK."):
            return False  # not a JetStream delivery (nothing is sent here but deliveries): nats-py's path
        self._offer(Delivery(self._nc, self._sid, subject, reply, data, block))
        return True

    async def _on_message(self, msg: Msg) -> None:
        self._offer(msg)

    def _offer(self, msg: Any) -> None:
        held = self._held
        if held is not None:  # waiting for room: keep arrival order behind what already waits
            if self._held_bytes + len(msg.data) > self._held_limit:
                self._dropped += 1
                return
            held.append(msg)
            self._held_bytes += len(msg.data)
            return
        assert self._sink is not None
        try:
            room = self._sink.take(msg)
        except Exception:  # a route must not raise; unacked, the message comes back after AckWait
            log.exception("could not take a delivery", extra=about(msg))
            return
        if not room:
            self._held = deque()
            self._resuming = asyncio.get_running_loop().create_task(self._resume(), name="cdc-push-resume")

    async def _resume(self) -> None:
        """Wait for room, then hand over what arrived meanwhile, in order, until none is left."""
        sink, held = self._sink, self._held
        assert sink is not None and held is not None
        try:
            while True:
                # First wait, even with nothing held yet: the next arrival must not be taken before there is room.
                await sink.wait_for_room()
                while held:
                    msg = held.popleft()
                    self._held_bytes -= len(msg.data)
                    if not sink.take(msg):
                        break
                else:
                    return  # all handed over, and the sink still had room
        finally:
            if self._dropped:
                log.warning(
                    "dropped deliveries while waiting for room; they come back after AckWait",
                    extra={"dropped": self._dropped, "limit_mb": self._held_limit // (1024 * 1024)},
                )
                self._dropped = 0
            self._held, self._held_bytes, self._resuming = None, 0, None

    async def stop(self) -> None:
        """Stop receiving; messages the server already sent are handed to the sink first."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                # UNSUB, then a PING/PONG round trip: every delivery sent before it has been parsed and offered.
                await sub.drain()
            except Exception as exc:  # connection already gone: the server redelivers after AckWait
                log.warning("could not drain the subscription", extra={"error": str(exc)[:200]})
        if self._resuming is not None:  # the engine released intake before this: the wait ends at once
            await self._resuming


class PullIntake:
    """Fetch batches from a shared pull durable."""

    def __init__(self, js: JetStreamContext, settings: IngestSettings) -> None:
        self._js = js
        self._settings = settings
        self._psub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._on_batch: Callable[[list[Msg]], Awaitable[None]] | None = None

    async def start(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        self._psub = await self._js.pull_subscribe_bind(self._settings.durable, stream=self._settings.stream)
        self._on_batch = on_batch
        self._running = True
        self._task = asyncio.create_task(self._loop(on_batch), name="cdc-pull")

    @property
    def active(self) -> bool:
        return self._running

    async def _loop(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        timeout = self._settings.fetch_timeout_ms / 1000.0
        while self._running:
            try:
                msgs = await self._psub.fetch(self._settings.batch_size, timeout=timeout)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, consumer gone: back off briefly and ask again
                log.warning("fetch failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
                await asyncio.sleep(0.5)
                continue
            if msgs:
                await on_batch(msgs)

    async def stop(self) -> None:
        """Stop fetching; every message the server delivered to this client is then processed or handed back.

        Contract: when ``stop`` returns, nothing delivered to this subscription is left for AckWait. nats-py queues
        what arrives on the pull inbox and takes from that queue only at the next fetch, so messages that arrive
        after a fetch timed out (late under load, or for the rest of a lingering request) are still there when the
        loop ends; a plain unsubscribe would drop them while the server counts them as delivered. So: the loop ends
        (its last batch goes to ``on_batch`` as usual), interest ends and everything already sent is collected
        (``_take_delivered``), and those messages go to ``on_batch`` too. The engine's drain finishes them, or at its
        deadline naks them without delay, so no delivery attempt is spent where the work can still be done. If
        ``on_batch`` raises, they are nak'ed here without delay so another replica takes them at once. ``on_batch``
        must own a batch before it first suspends: what follows is back-pressure, which ``stop`` may cut short.
        """
        self._running = False
        bound = self._settings.fetch_timeout_ms / 1000.0 + 2.0
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, bound)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._task = None
        psub, self._psub = self._psub, None
        if psub is None or self._on_batch is None:
            return
        left = await _take_delivered(psub)
        if not left:
            return
        log.info("handing on messages received after the last fetch", extra={"count": len(left)})
        try:
            await asyncio.wait_for(self._on_batch(left), bound)
        except TimeoutError:
            pass  # the batch was taken; only its back-pressure wait was cut short, and the drain finishes it
        except Exception as exc:
            log.warning("could not pass on, handing back", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            for msg in left:
                try:
                    await msg.nak()
                except Exception:  # connection gone: the server redelivers after AckWait, nothing else to do
                    pass


async def _take_delivered(psub: Any) -> list[Msg]:
    """End a nats-py pull subscription and return the messages it received that no fetch took.

    nats-py 2.x has no public call for this, hence its internals: the UNSUB goes out while the subscription is still
    registered in the client, the PING/PONG of ``flush`` proves that everything the server sent before the UNSUB has
    been read into the pending queue, and only then is the queue emptied and the subscription removed from the client
    (removing it first would drop what is still on its way). Status messages (the 408 of an expired request) are no
    work and are left out.
    """
    sub = psub._sub
    try:
        await sub._conn._send_unsubscribe(sub._id)
        await sub._conn.flush(2)
    except Exception as exc:  # disconnected: take what is queued; anything still on its way returns after AckWait
        log.warning(
            "could not end the pull subscription cleanly", extra={"error": f"{type(exc).__name__}: {exc}"[:300]}
        )
    queue = sub._pending_queue
    delivered: list[Msg] = []
    while not queue.empty():
        msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        if not JetStreamContext.is_status_msg(msg):
            delivered.append(msg)
    try:
        await psub.unsubscribe()
    except Exception:  # closed or reconnecting: the client drops the subscription with the connection
        pass
    return delivered
