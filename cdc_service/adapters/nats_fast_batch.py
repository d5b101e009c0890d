"""JetStream fast-ingest batch publishing (stream option ``allow_batched``, nats-server 2.14+).

The protocol, as nats-server implements it: every message of a batch is a plain publish whose reply subject carries the
batch, ``<prefix>.<batch id>.<flow>.<gap mode>.<batch seq>.<op>.$FI`` (op 0 = first message, seq 1; 1 = append;
3 = commit without a message, seq = last + 1). The stream stores each message as it arrives, in order, with the usual
per-message checks (``Nats-Msg-Id`` de-duplication, ``Nats-Expected-Stream``, limits). It answers on the reply subject
of the message that triggered the answer:

- ``{"type":"ack","seq":S,"msgs":N}``: every message up to S is stored (or was a duplicate, which is skipped
  silently); the next flow ack follows after N more. The first message gets one with S = 0.
- ``{"type":"err","seq":S,"error":{...}}``: message S was refused; in gap mode ``fail`` (ours) the batch ends there:
  nothing after S is stored, and a PubAck follows.
- a PubAck ``{"stream":...,"seq":...,"batch":id,"count":C}``: the batch is over; messages 1..C are stored.
- a PubAck-style error ``{"error":{...}}`` on one message's reply: that message was refused, e.g. an unknown batch
  (the server restarted, or cleaned the batch up), or the first message of a batch failed (the batch ends).

So one answer covers many events, and what is stored is always a prefix of the batch: a refusal or a lost batch never
leaves a later event stored before an earlier one. See docs/performance.md for how this composes with the engine's
hold and retry rules and with ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.nuid import NUID

from cdc_service.adapters.nats_jetstream import NoStreamResponse, PipelinedPublisher, rejection, send_publish
from cdc_service.config import Settings
from cdc_service.core.partitions import server_version
from cdc_service.core.subjects import covers
from cdc_service.ports import PubAck, PublishRejected

log = logging.getLogger("cdc_service.nats")

MIN_SERVER = (2, 14)
BATCH_DISABLED = 10205  # "batch publish is disabled": the stream's allow_batched was switched off
UNKNOWN_BATCH = 10208  # the server does not know the batch (restarted, or cleaned it up after inactivity)
_START, _APPEND, _COMMIT_EOB = 0, 1, 3


async def enable_fast_batch(nc: Client, js: JetStreamContext, stream: str) -> str:
    """Switch ``allow_batched`` on for ``stream`` if the server can; return ``""`` on success, else why not.

    Support is detected twice: the server's version (2.14 or newer), then the stream's configuration as the server
    reports it after the update (a server that does not know the option drops it silently).
    """
    version = str(nc._server_info.get("version", ""))
    parsed = server_version(version)
    if parsed is None or parsed < MIN_SERVER:
        return f"nats-server {version or '(unknown version)'} has no fast batch publishing (2.14 or newer needed)"
    try:
        config = (await js.stream_info(stream)).config
        if not config.allow_batched:
            config.allow_batched = True
            config = (await js.update_stream(config)).config
    except (JetStreamError, TimeoutError) as exc:
        return f"the stream {stream} refused allow_batched: {type(exc).__name__}: {exc}"[:300]
    if not config.allow_batched:
        return f"the stream {stream} did not keep allow_batched"
    return ""


async def choose_publisher(
    nc: Client, js: JetStreamContext, settings: Settings
) -> FastBatchPublisher | PipelinedPublisher:
    """The fast-batch publisher when ``publish.fast_batch`` is on and the server and stream support it, else the
    pipelined one (logged, so an operator sees the setting has no effect)."""
    if settings.publish.fast_batch:
        problem = await enable_fast_batch(nc, js, settings.publish.stream)
        if not problem:
            log.info("publishing in fast batches", extra={"stream": settings.publish.stream})
            return FastBatchPublisher(nc, settings.publish.subjects)
        log.warning("publish.fast_batch is on but cannot be used; publishing one by one", extra={"reason": problem})
    return PipelinedPublisher(nc)


class _Batch:
    """One open or answered fast batch: the futures of its events, in batch sequence order (seq 1 = index 0)."""

    __slots__ = ("committed", "futures", "id", "resolved", "subject")

    def __init__(self, batch_id: str) -> None:
        self.id = batch_id
        self.futures: list[asyncio.Future[PubAck]] = []
        self.resolved = 0  # futures[:resolved] have been settled by an answer
        self.committed = False
        self.subject = ""  # of the latest event: the commit goes to the same stream

    def stored_up_to(self, seq: int) -> None:
        """Events 1..seq are in the stream (stored, or dropped as a repeat of their Nats-Msg-Id)."""
        futures = self.futures
        for index in range(self.resolved, min(seq, len(futures))):
            future = futures[index]
            if not future.done():
                future.set_result(_STORED)
        self.resolved = max(self.resolved, min(seq, len(futures)))

    def fail_from(self, seq: int, reason: str) -> None:
        """Events from ``seq`` on were not stored: fail them (transient: the engine holds and retries them)."""
        for future in self.futures[max(0, seq - 1) :]:
            if not future.done():
                future.set_exception(PublishRejected(reason))
        self.resolved = len(self.futures)

    def refuse(self, seq: int, exc: PublishRejected) -> None:
        if 0 < seq <= len(self.futures):
            future = self.futures[seq - 1]
            if not future.done():
                future.set_exception(exc)

    @property
    def open(self) -> bool:
        return any(not f.done() for f in self.futures)


class FastBatchPublisher:
    """``Publisher`` for the output stream through fast-ingest batches; the same contract as ``PipelinedPublisher``.

    Events are appended to the open batch; the batch is committed (an end-of-batch message, nothing stored) once the
    caller yields to the loop, or after ``max_batch`` events. Each event's future resolves when an answer covers it:
    with an empty ``PubAck`` (a repeat of a ``Nats-Msg-Id`` inside a batch is dropped by the stream without saying
    so, hence ``duplicate`` is always false here), or with ``PublishRejected`` (the event itself was refused, or an
    earlier event of its batch was, so it was not stored). A future may never resolve (lost answer): callers bound
    the wait, and a retry reuses the ``Nats-Msg-Id``. ``detailed`` publishes and subjects outside ``subjects`` (the
    output stream's: dead letters) go through the pipelined publisher on the same connection, in submission order.
    If the stream stops accepting batches (``allow_batched`` switched off), everything goes through the pipelined
    publisher from then on.
    """

    def __init__(
        self, nc: Client, subjects: Sequence[str] = ("wa.>",), *, flow: int = 256, max_batch: int = 1024
    ) -> None:
        self._nc = nc
        # Only subjects of the output stream go into batches (a dead letter from the advisory watcher is not
        # "detailed" but goes to another stream, which would refuse the batch). "wa.>"-like patterns are a prefix
        # test; anything else is matched token by token.
        self._subjects = tuple(subjects)
        prefixes = [p[:-1] for p in self._subjects if p.endswith(".>") and "*" not in p and ">" not in p[:-1]]
        self._prefixes = tuple(prefixes) if len(prefixes) == len(self._subjects) else None
        self._pipelined = PipelinedPublisher(nc)
        self._nuid = NUID().next().decode()
        self._root = f"_CDC_FI.{self._nuid}"
        self._flow = flow
        self._max_batch = max_batch
        self._batches: dict[str, _Batch] = {}
        self._open: _Batch | None = None
        self._count = 0
        self._sub: Any = None
        self._commits: set[asyncio.Task[None]] = set()  # referenced until done (the loop keeps only weak references)
        self.disabled = False

    async def start(self) -> None:
        await self._pipelined.start()
        self._sub = await self._nc.subscribe(self._root + ".>", cb=self._on_reply)

    @property
    def pending(self) -> int:
        return self._pipelined.pending + sum(1 for b in self._batches.values() for f in b.futures if not f.done())

    @property
    def max_payload(self) -> int:
        return self._pipelined.max_payload

    def _reply(self, batch: _Batch, seq: int, op: int) -> str:
        return f"{self._root}.{batch.id}.{self._flow}.fail.{seq}.{op}.$FI"

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, detailed: bool = False
    ) -> asyncio.Future[PubAck]:
        if detailed or self.disabled or not self._batched(subject):
            return await self._pipelined.publish(subject, payload, headers, detailed=detailed)
        batch = self._open
        if batch is None:
            self._count += 1
            batch = self._open = _Batch(f"{self._nuid}{self._count}")
            self._batches[batch.id] = batch
            task = asyncio.get_running_loop().create_task(self._commit_after_yield(batch))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        batch.futures.append(future)
        batch.subject = subject
        seq = len(batch.futures)
        try:
            reply = self._reply(batch, seq, _START if seq == 1 else _APPEND)
            await send_publish(self._nc, subject, reply, payload, headers)
        except Exception as exc:  # closed, draining, buffer full while reconnecting: this and the rest of the batch
            self._close(batch)
            batch.fail_from(seq, f"{type(exc).__name__}: {exc}")
            return future
        if seq >= self._max_batch:
            await self._commit(batch)
        return future

    def _batched(self, subject: str) -> bool:
        if self._prefixes is not None:
            return subject.startswith(self._prefixes)
        tokens = subject.split(".")
        return any(covers(pattern, tokens) for pattern in self._subjects)

    def _close(self, batch: _Batch) -> None:
        if self._open is batch:
            self._open = None

    async def _commit_after_yield(self, batch: _Batch) -> None:
        # This task runs once the publishing caller yields to the loop: the end of its burst of publishes.
        await asyncio.sleep(0)
        await self._commit(batch)

    async def _commit(self, batch: _Batch) -> None:
        if batch.committed:
            return
        batch.committed = True
        self._close(batch)
        if not batch.futures:
            return
        try:
            # An end-of-batch commit stores nothing; it must reach the same stream, hence the last event's subject.
            await self._nc.publish(batch.subject, b"", reply=self._reply(batch, len(batch.futures) + 1, _COMMIT_EOB))
        except Exception as exc:
            batch.fail_from(batch.resolved + 1, f"{type(exc).__name__}: {exc}")

    def sweep(self) -> None:
        self._pipelined.sweep()
        for batch_id in [i for i, b in self._batches.items() if b.committed and not b.open]:
            del self._batches[batch_id]

    async def _on_reply(self, msg: Msg) -> None:
        # <root>.<batch id>.<flow>.fail.<seq>.<op>.$FI: the batch id is the third token, the sequence the sixth.
        tokens = msg.subject.split(".")
        batch = self._batches.get(tokens[2]) if len(tokens) == 8 else None
        if batch is None:
            return
        seq = int(tokens[5]) if tokens[5].isdigit() else 0
        if msg.headers and msg.headers.get("Status") == "503":
            batch.refuse(seq, NoStreamResponse("no stream answered the publish (503)"))
            batch.fail_from(seq + 1, "not stored: an earlier event of its fast batch found no stream")
            return
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            batch.refuse(seq, PublishRejected(f"unreadable fast batch answer {msg.data[:100]!r}"))
            return
        self._answer(batch, seq, reply)

    def _answer(self, batch: _Batch, seq: int, reply: dict[str, Any]) -> None:
        kind = reply.get("type")
        if kind == "ack":  # flow control: everything up to "seq" is in the stream
            batch.stored_up_to(int(reply.get("seq", 0)))
        elif kind == "err":  # the event was refused; the batch ends there and its PubAck (with the count) follows
            batch.refuse(int(reply.get("seq", seq)), rejection(reply.get("error")))
        elif kind == "gap":  # informational: the batch ends (gap mode "fail"), its PubAck follows
            pass
        elif reply.get("error"):
            self._refused(batch, seq, rejection(reply["error"]))
        else:  # the PubAck that ends the batch: 1..count are stored, the rest were not
            count = int(reply.get("count", 0))
            batch.stored_up_to(count)
            batch.fail_from(count + 1, f"not stored: its fast batch ended after event {count}")

    def _refused(self, batch: _Batch, seq: int, exc: PublishRejected) -> None:
        disabled = exc.code == BATCH_DISABLED
        if disabled:
            if not self.disabled:
                log.warning(
                    "the output stream refuses fast batches (allow_batched is off); publishing one by one from now on"
                )
            self.disabled = True
            exc = PublishRejected(str(exc))  # transient: the retry goes through the pipelined publisher
        if exc.code == UNKNOWN_BATCH or seq > len(batch.futures):
            # The server does not have the batch (restarted, or it ended): what no answer covered may or may not be
            # stored. Retrying it with the same Nats-Msg-Id is safe either way.
            batch.refuse(seq, exc)
            batch.fail_from(batch.resolved + 1, f"not confirmed: its fast batch was lost ({exc})")
            self._close(batch)
            return
        batch.refuse(seq, exc)
        if seq == 1 or disabled:
            # The batch never started on the server: nothing after this event was or will be stored in it.
            batch.fail_from(seq + 1, f"not stored: its fast batch ended at event {seq} ({exc})")
            self._close(batch)
        # Otherwise (a per-message refusal before the batch logic, such as the size limit) the server ends the batch
        # at the next event or the commit, as a gap, and its PubAck says how many were stored.


_STORED = PubAck("", 0, False)
