"""Partitioned ordering on JetStream: the partitioned stream, one pinned durable per partition, membership, pulling.

How it fits together (``ingest.ordering = "partitioned"``):

- **Partitioning** is the server's: a stream sourced from the input stream stores each event under
  ``<partition>.<subject>``, the partition being ``partition(n, <company or schema token>)``. One tenant's events are
  in one partition, in the input stream's order.
- **One owner per partition** is the server's too: each partition has a pull durable with a priority group and the
  ``pinned_client`` policy, so only the pinned puller receives messages; another puller gets them only after the
  pin is released (``$JS.API.CONSUMER.UNPIN``) or expires (``ingest.pin_timeout`` without a pull request).
- **Spreading** uses a KV bucket whose entries expire after ``ingest.member_ttl``: each replica writes its key every
  third of that, reads the live keys and pulls the partitions ``core.partitions.assign`` gives it.
- **Takeover keeps order**: a replica that receives a partition under a new pin while someone else still has
  messages of it unacked drops what it received, recreates the durable to start after its ack floor, and pulls
  again. What the previous owner had already published comes again and de-duplication drops it; as every owner
  publishes in stream order, the first copy of each event lands in order.

nats-py 2.16 has no priority-group API: the JetStream API subjects are used directly. Everything here runs on the
loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig, StreamSource, SubjectTransform
from nats.js.errors import BadRequestError, NotFoundError
from nats.nuid import NUID

from cdc_service.adapters.nats_jetstream import ProvisioningError
from cdc_service.config import IngestSettings, Settings
from cdc_service.core import partitions as core
from cdc_service.metrics import Metrics

log = logging.getLogger("cdc_service.partitions")

PIN_HEADER = "Nats-Pin-Id"
_CONSUMER_NOT_FOUND = 10014
_CONSUMER_EXISTS = 10148  # action "create" on an existing durable with another configuration
_NANOS = 1_000_000_000
_API_TIMEOUT = 5.0


class ApiError(RuntimeError):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} (code {code})")
        self.code = code


def durable_name(ingest: IngestSettings, partition: int) -> str:
    return f"{ingest.durable}_p{partition}"


def transforms(settings: Settings) -> list[SubjectTransform]:
    ingest = settings.ingest
    return [
        SubjectTransform(src=pattern, dest=core.transform(pattern, settings.layout, ingest.partitions))
        for pattern in ingest.subjects
    ]


async def _api(nc: Client, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JetStream API request; raises ``ApiError`` with the server's code on an error reply."""
    reply = await nc.request(subject, orjson.dumps(body) if body is not None else b"", timeout=_API_TIMEOUT)
    data = orjson.loads(reply.data) if reply.data else {}
    error = data.get("error") if isinstance(data, dict) else None
    if error:
        raise ApiError(int(error.get("err_code") or error.get("code") or 0), str(error.get("description", "error")))
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------------------------------------------------------
# Provisioning


async def ensure_partitioned_stream(js: JetStreamContext, settings: Settings) -> None:
    """Create the partitioned stream, sourced from the input stream; refuse one partitioned another way.

    A new stream starts after the ack floor of the replica-mode durable when that exists (switching modes does
    not replay what was already relayed), else at the input stream's first message.
    """
    ingest = settings.ingest
    wanted = transforms(settings)
    try:
        info = await js.stream_info(ingest.partition_stream)
    except NotFoundError:
        info = None
    if info is not None:
        sources = info.config.sources or []
        have = [(t.src, t.dest) for s in sources for t in (s.subject_transforms or [])]
        if have != [(t.src, t.dest) for t in wanted]:
            raise ProvisioningError(
                f"ingest.partitions: stream {ingest.partition_stream} partitions as {have}, the settings as "
                f"{[(t.src, t.dest) for t in wanted]}; the count is fixed when the stream is created "
                "(docs/operations.md: changing the partition count)"
            )
        return
    start = 0
    with contextlib.suppress(NotFoundError):
        replica = await js.consumer_info(ingest.stream, ingest.durable)
        start = int(replica.ack_floor.stream_seq or 0) + 1 if replica.ack_floor else 0
    source = StreamSource(name=ingest.stream, subject_transforms=wanted)
    if start > 1:
        source.opt_start_seq = start
    config = StreamConfig(
        name=ingest.partition_stream,
        sources=[source],
        num_replicas=ingest.stream_replicas,
        storage=StorageType.FILE,
        max_age=ingest.stream_max_age,
    )
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # another replica created it at the same moment: the check above runs next start
            raise ProvisioningError(f"cannot create stream {ingest.partition_stream}: {exc.description}") from None
    log.info(
        "partitioned stream created",
        extra={"stream": ingest.partition_stream, "partitions": ingest.partitions, "source_start": start or 1},
    )


def consumer_request(ingest: IngestSettings, partition: int, start_seq: int | None) -> dict[str, Any]:
    """The CONSUMER.CREATE body of one partition's durable; ``start_seq`` makes it deliver from that sequence."""
    config: dict[str, Any] = {
        "durable_name": durable_name(ingest, partition),
        "ack_policy": "explicit",
        "ack_wait": int(ingest.ack_wait * _NANOS),
        "max_deliver": ingest.max_deliver,
        "max_ack_pending": ingest.max_ack_pending,
        "filter_subject": core.filter_subject(partition),
        "deliver_policy": "all",
        "max_waiting": 512,
        "priority_groups": [core.PRIORITY_GROUP],
        "priority_policy": "pinned_client",
        "priority_timeout": int(ingest.pin_timeout * _NANOS),
    }
    if start_seq is not None and start_seq > 1:
        config["deliver_policy"] = "by_start_sequence"
        config["opt_start_seq"] = start_seq
    return {"stream_name": ingest.partition_stream, "config": config}


async def ensure_partition_consumer(
    nc: Client, ingest: IngestSettings, partition: int, attempts: int = 5, backoff: float = 0.2
) -> None:
    """Create the durable, or update an existing one's editable fields keeping where it starts.

    Retried a few times: a running replica taking the partition over deletes and recreates the durable, and an
    update racing that fails on the server (seen: code 10012, the consumer's store directory removed under it).
    """
    name = durable_name(ingest, partition)
    for attempt in range(1, attempts + 1):
        try:
            start: int | None = None
            try:
                existing = await _api(nc, f"$JS.API.CONSUMER.INFO.{ingest.partition_stream}.{name}")
                start = int(existing.get("config", {}).get("opt_start_seq") or 0) or None
            except ApiError as exc:
                if exc.code != _CONSUMER_NOT_FOUND:
                    raise
            await _api(
                nc,
                f"$JS.API.CONSUMER.CREATE.{ingest.partition_stream}.{name}",
                consumer_request(ingest, partition, start),
            )
            return
        except ApiError as exc:
            if attempt == attempts:
                raise ProvisioningError(f"cannot create or update consumer {name}: {exc}") from None
            log.warning(
                "partition durable not created yet; retrying", extra={"consumer": name, "error": str(exc)[:300]}
            )
            await asyncio.sleep(backoff * attempt)


# ---------------------------------------------------------------------------------------------------------------
# Intake


@dataclass(eq=False)
class _Partition:
    index: int
    durable: str
    pin: str | None = None  # the pin this replica accepted; None while it holds none
    floor: int = 0  # highest ack floor seen: where a recreated durable resumes
    # Pins of durables this replica deleted in a takeover: their late messages are dropped, as the recreated
    # durable delivers them again in order (processing one would put it ahead of the ones dropped with it).
    retired: deque[str] = field(default_factory=lambda: deque(maxlen=32))
    running: bool = False
    task: asyncio.Task[None] | None = None


class PartitionedIntake:
    """Pull the partitions this replica owns, each from its own pinned durable, handing batches to ``on_batch``."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: Settings, metrics: Metrics, member: str) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._ingest = settings.ingest
        self._metrics = metrics
        self.member = member
        self._partitions = {p: _Partition(p, durable_name(self._ingest, p)) for p in range(self._ingest.partitions)}
        self._bucket = self._ingest.member_bucket
        self._kv: Any = None
        self._on_batch: Callable[[list[Msg]], Awaitable[None]] | None = None
        self._membership: asyncio.Task[None] | None = None
        self._inbox = f"_CDC_PULL.{NUID().next().decode()}"
        self._running = False
        # With no_wait a request returns as soon as anything is delivered, so a long expiry adds no latency; it only
        # bounds idle polling. Every request renews the pin, so it must come well within pin_timeout.
        self._expires = min(1.0, self._ingest.pin_timeout / 4)

    # -------------------------------------------------------------------------------------------- lifecycle

    async def start(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        self._on_batch = on_batch
        for p in range(self._ingest.partitions):
            await ensure_partition_consumer(self._nc, self._ingest, p)
        config = KeyValueConfig(bucket=self._bucket, ttl=self._ingest.member_ttl, history=1)
        config.replicas = self._ingest.stream_replicas
        try:
            self._kv = await self._js.create_key_value(config)
        except BadRequestError:  # exists with other settings (an operator's choice): use it as it is
            self._kv = await self._js.key_value(self._bucket)
        self._running = True
        await self._rebalance()
        self._membership = asyncio.create_task(self._keep_membership(), name="cdc-membership")

    @property
    def active(self) -> bool:
        return self._running

    def owned(self) -> list[int]:
        """Partitions this replica pulls (the membership gave them to it). The server pins a puller only when it has
        a message to deliver, so an idle partition has no pin: pulling, not the pin, is what ownership means here."""
        return [p.index for p in self._partitions.values() if p.running]

    async def stop(self) -> None:
        """Leave the membership (others take over at their next look), stop pulling, release the pins held."""
        self._running = False
        if self._membership is not None:
            self._membership.cancel()
            await asyncio.gather(self._membership, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._js.purge_stream(f"KV_{self._bucket}", subject=f"$KV.{self._bucket}.{self.member}")
        for partition in self._partitions.values():
            partition.running = False
        tasks = [p.task for p in self._partitions.values() if p.task is not None]
        # A pull ends within its expiry; then its batch is handed over and its pin released.
        _done, late = await asyncio.wait(tasks, timeout=self._expires + 5.0) if tasks else (set(), set())
        for task in late:
            task.cancel()

    # -------------------------------------------------------------------------------------------- membership

    async def _keep_membership(self) -> None:
        period = self._ingest.member_ttl / 3
        while self._running:
            await asyncio.sleep(period)
            try:
                await self._rebalance()
                await self._export_lag()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # disconnected, timeout: keep pulling what we pull, look again next period
                log.debug("membership round failed", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})

    async def live_members(self) -> list[str]:
        """Keys written within ``member_ttl``: the bucket keeps one entry per key and drops it after the TTL."""
        prefix = f"$KV.{self._bucket}."
        info = await self._js.stream_info(f"KV_{self._bucket}", subjects_filter=prefix + ">")
        return [s[len(prefix) :] for s in (info.state.subjects or {})]

    async def _rebalance(self) -> None:
        await self._kv.put(self.member, b"1")
        members = await self.live_members()
        if self.member not in members:
            members.append(self.member)
        mine = {p for p, owner in core.assign(self._ingest.partitions, members).items() if owner == self.member}
        self._metrics.partition_members.set(len(members))
        for partition in self._partitions.values():
            idle = partition.task is None or partition.task.done()
            if partition.index in mine and idle:
                self._start_partition(partition)
            elif partition.index not in mine:
                partition.running = False  # its pull ends after the current request and releases the pin
        self._metrics.partitions_owned.set(len(self.owned()))

    async def _export_lag(self) -> None:
        """The backlog and ack-floor gauges over the durables this replica pulls.

        Backlog: the sum of their ``num_pending``. Each partition is pulled by one replica, so ``sum`` across replicas
        is the whole lag of the partitioned stream (a partition changing hands may be counted twice or not at all for
        one round). Ack floor: the lowest of theirs, the partitioned stream's sequence below which every message of
        this replica's partitions is acked. One consumer info per owned durable per membership round.
        """
        owned = [p for p in self._partitions.values() if p.running]
        backlog, floors = 0, []
        for partition in owned:
            info = await self._info(partition)
            backlog += int(info.get("num_pending") or 0)
            floors.append(int(info.get("ack_floor", {}).get("stream_seq") or 0))
        self._metrics.backlog.set(backlog)
        if floors:
            self._metrics.ack_floor.set(min(floors))

    # -------------------------------------------------------------------------------------------- pulling

    def _start_partition(self, partition: _Partition) -> None:
        partition.running = True
        partition.task = asyncio.create_task(self._pull(partition), name=f"cdc-pull-p{partition.index}")
        log.info("pulling partition", extra={"partition": partition.index, "member": self.member})

    async def _release(self, partition: _Partition) -> None:
        """After the last pull: release the pin now, so the next owner need not wait for pin_timeout; only if it is
        still ours (the next owner may already have unpinned us and been pinned)."""
        pin, partition.pin = partition.pin, None
        self._metrics.partitions_owned.set(len(self.owned()))
        if pin is not None:
            with contextlib.suppress(Exception):
                if await self._pinned_id(partition) == pin:
                    await self._unpin(partition)

    async def _pull(self, partition: _Partition) -> None:
        assert self._on_batch is not None
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            queue.put_nowait(msg)

        inbox = f"{self._inbox}.{partition.index}"
        sub = await self._nc.subscribe(inbox + ".*", cb=deliver)
        try:
            # A departed owner's pin would otherwise hold the partition until pin_timeout.
            with contextlib.suppress(Exception):
                await self._unpin(partition)
            token = 0
            while partition.running:
                token += 1
                try:
                    msgs, status = await self._request(partition, queue, f"{inbox}.{token}")
                    if status == "423":  # someone else holds the pin: wait as a standby until it is released
                        self._lose_pin(partition)
                    elif status == "503":  # no durable answered: deleted, by an operator or by a takeover under way
                        await self._recreate(partition)
                    if partition.retired:
                        msgs = [m for m in msgs if (m.headers or {}).get(PIN_HEADER) not in partition.retired]
                    if msgs and await self._accept(partition, msgs):
                        for msg in msgs:
                            msg.subject = core.original_subject(msg.subject)
                        await self._on_batch(msgs)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # disconnected, timeout: back off briefly and ask again
                    log.warning(
                        "partition pull failed",
                        extra={"partition": partition.index, "error": f"{type(exc).__name__}: {exc}"[:300]},
                    )
                    await asyncio.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self._release(partition)

    async def _request(self, partition: _Partition, queue: asyncio.Queue[Msg], reply: str) -> tuple[list[Msg], str]:
        """One pull request: what is available now (up to a batch), or the first messages within the fetch timeout.

        Returns the messages and the status that ended the request ("" when the batch filled or time ran out).
        Messages of an earlier request that arrive late are kept: the server delivered them to this replica.
        """
        ingest = self._ingest
        expires = self._expires
        body: dict[str, Any] = {
            "batch": ingest.batch_size,
            "expires": int(expires * _NANOS),
            "no_wait": True,  # with expires: return as soon as anything was delivered
            "group": core.PRIORITY_GROUP,
        }
        if partition.pin is not None:
            body["id"] = partition.pin  # renews the pin; a stale one is answered with 423
        await self._nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{ingest.partition_stream}.{partition.durable}",
            orjson.dumps(body),
            reply=reply,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + expires + 2.0
        msgs: list[Msg] = []
        while len(msgs) < ingest.batch_size:
            if queue.empty():  # wait_for costs a task per call: only when there is something to wait for
                try:
                    msg = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    return msgs, ""
            else:
                msg = queue.get_nowait()
            if msg.reply:
                msgs.append(msg)
                continue
            status = (msg.headers or {}).get("Status", "")
            if msg.subject == reply and status != "100":  # 404/408 end a request normally; others too
                if status not in ("404", "408", "409", "423", "503"):
                    log.warning(
                        "pull request refused",
                        extra={"partition": partition.index, "status": status, "detail": str(msg.headers)[:200]},
                    )
                return msgs, status
        return msgs, ""

    async def _accept(self, partition: _Partition, msgs: list[Msg]) -> bool:
        """Whether to process ``msgs``; False after a takeover dropped them (they come again, in order)."""
        pins = {(m.headers or {}).get(PIN_HEADER) for m in msgs}
        if pins == {partition.pin}:
            return True
        pending = await self._ack_pending(partition)
        if len(pins) == 1 and pending <= len(msgs):
            # A new pin and nobody else holds anything unacked: nothing older can arrive behind these.
            partition.pin = pins.pop()
            log.info("partition pinned", extra={"partition": partition.index, "member": self.member})
            return True
        partition.retired.extend(p for p in pins if p)
        if partition.pin:
            partition.retired.append(partition.pin)
        await self._take_over(partition, pending)
        return False

    async def _take_over(self, partition: _Partition, pending: int) -> None:
        """Recreate the durable to start after its ack floor: what another owner left unacked is delivered again,
        before anything newer. The messages received under the new pin are dropped unacked with the old durable."""
        subject = f"{self._ingest.partition_stream}.{partition.durable}"
        info = await self._info(partition)
        floor = int(info.get("ack_floor", {}).get("stream_seq") or 0)
        configured = int(info.get("config", {}).get("opt_start_seq") or 0)
        with contextlib.suppress(ApiError):
            await _api(self._nc, f"$JS.API.CONSUMER.DELETE.{subject}")
        await self._create(partition, max(partition.floor + 1, configured))
        self._lose_pin(partition)
        self._metrics.partition_takeovers.inc()
        log.info(
            "partition taken over; resuming after its ack floor",
            extra={"partition": partition.index, "ack_floor": floor, "unacked": pending, "member": self.member},
        )

    def _lose_pin(self, partition: _Partition) -> None:
        partition.pin = None

    async def _recreate(self, partition: _Partition) -> None:
        log.warning("partition durable missing; recreating it", extra={"partition": partition.index})
        await self._create(partition, partition.floor + 1)

    async def _create(self, partition: _Partition, start: int) -> None:
        """Create the durable to deliver from ``start``, unless someone else created it first (a replica taking
        the partition over at the same moment): that one is kept, replacing it would move its start."""
        body = consumer_request(self._ingest, partition.index, start)
        body["action"] = "create"
        try:
            await _api(self._nc, f"$JS.API.CONSUMER.CREATE.{self._ingest.partition_stream}.{partition.durable}", body)
        except ApiError as exc:
            if exc.code != _CONSUMER_EXISTS:
                raise

    async def _info(self, partition: _Partition) -> dict[str, Any]:
        info = await _api(self._nc, f"$JS.API.CONSUMER.INFO.{self._ingest.partition_stream}.{partition.durable}")
        partition.floor = max(partition.floor, int(info.get("ack_floor", {}).get("stream_seq") or 0))
        return info

    async def _ack_pending(self, partition: _Partition) -> int:
        return int((await self._info(partition)).get("num_ack_pending") or 0)

    async def _pinned_id(self, partition: _Partition) -> str:
        info = await self._info(partition)
        groups = info.get("priority_groups") or []
        return str(groups[0].get("pinned_client_id", "")) if groups else ""

    async def _unpin(self, partition: _Partition) -> None:
        await _api(
            self._nc,
            f"$JS.API.CONSUMER.UNPIN.{self._ingest.partition_stream}.{partition.durable}",
            {"group": core.PRIORITY_GROUP},
        )
