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
- **Only the owner creates a durable**, by the membership read at that moment, and only once it stayed missing for
  ``settle_time()``: a create landing in another replica's delete leaves a durable without its store, and one landing
  in a takeover (between its delete and create) would start the partition over. A takeover whose create meets a
  durable created meanwhile from an earlier start replaces it (``create_partition_consumer``).

nats-py 2.16 has no priority-group API: the JetStream API subjects are used directly. Everything here runs on the
loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
_CONSUMER_CREATE_FAILED = 10012  # any failure of a create or update: a refused field, a store error
_CONSUMER_EXISTS = 10148  # action "create" on an existing durable with another configuration
_NANOS = 1_000_000_000
_API_TIMEOUT = 5.0
# A takeover sends its create one round trip after its delete is answered: a durable still missing this long after it
# was found missing is not in the middle of one (unless a request took this long on a loaded server).
_SETTLE = 0.5
_CREATE_ATTEMPTS = 3

# Whether the current membership gives the partition to this replica (read when called).
Owns = Callable[[], Awaitable[bool]]


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
        _check_partitioning(ingest, info.config, wanted)
        return
    start = await _replica_resume_point(js, ingest)
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


def _check_partitioning(ingest: IngestSettings, config: StreamConfig, wanted: list[SubjectTransform]) -> None:
    """An existing partitioned stream must partition as the settings say: the count is fixed at creation."""
    have = [(t.src, t.dest) for s in config.sources or [] for t in (s.subject_transforms or [])]
    if have != [(t.src, t.dest) for t in wanted]:
        raise ProvisioningError(
            f"ingest.partitions: stream {ingest.partition_stream} partitions as {have}, the settings as "
            f"{[(t.src, t.dest) for t in wanted]}; the count is fixed when the stream is created "
            "(docs/operations.md: changing the partition count)"
        )


async def _replica_resume_point(js: JetStreamContext, ingest: IngestSettings) -> int:
    """The input stream sequence after the replica-mode durable's ack floor; 0 when there is no such durable."""
    with contextlib.suppress(NotFoundError):
        replica = await js.consumer_info(ingest.stream, ingest.durable)
        return int(replica.ack_floor.stream_seq or 0) + 1 if replica.ack_floor else 0
    return 0


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


# Fields a durable keeps from its creation: the server refuses an update that changes them (code 10012). Absent from
# a consumer info, they have these values.
_FIXED = {
    "ack_policy": None,
    "max_waiting": None,
    "replay_policy": "instant",
    "deliver_subject": None,
    "mem_storage": False,
    "flow_control": False,
    "idle_heartbeat": 0,
}
# Where a durable starts: copied from the existing durable into an update, never set by one.
_START = ("deliver_policy", "opt_start_seq", "opt_start_time")


def retry_window(ingest: IngestSettings) -> float:
    """How long start-up keeps retrying a partition durable that other replicas are recreating.

    Takeovers follow a membership change within ``member_ttl + member_ttl / 3`` (§9.1: a key expires, then a round);
    twice ``member_ttl`` covers that and the round trips of the attempts themselves.
    """
    return 2 * ingest.member_ttl


async def ensure_partition_consumer(
    nc: Client, ingest: IngestSettings, partition: int, owns: Owns | None = None
) -> None:
    """Create the durable if it is missing and the partition is this replica's (``owns``, read when needed; None:
    it is), or update an existing one whose editable fields differ from the settings, keeping where it starts. One
    already as configured is not written to. A missing durable is created only after it stayed missing for
    ``settle_time()`` (``create_missing_consumer``), from the start of the partition: this replica knows no ack floor.

    Other replicas delete and recreate the durable at any time (a takeover), so each step can race one: a create
    finds it created (10148), an update finds it deleted (10014) or replaced with another start (10012), a request
    times out on a loaded server. Each of these reads the durable again and tries again, for
    ``retry_window(ingest)``; then ``ProvisioningError``. A create racing another replica's delete can also leave a
    durable whose store directory that delete removed: the server serves it but fails every update of it (10012,
    ``open .../meta.inf.tmp: no such file or directory``). When an update the durable accepts fails on the same
    durable, its owner recreates it after its ack floor, as a takeover does; another replica leaves it. An existing
    durable the settings cannot be applied to (a fixed field differs: push, ``ack_policy``, ``max_waiting``...)
    raises ``ProvisioningError`` at once, naming the fields.
    """
    name = durable_name(ingest, partition)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_window(ingest)
    attempt = 0
    while True:
        attempt += 1
        try:
            if await _ensure_once(nc, ingest, partition, owns):
                return
            error = "recreated after its ack floor"
        except (ApiError, nats.errors.TimeoutError) as exc:
            error = str(exc) or type(exc).__name__
        if loop.time() >= deadline:
            raise ProvisioningError(f"cannot create or update consumer {name}: {error}")
        log.info(
            "partition durable changed under start-up; reading it again", extra={"consumer": name, "error": error[:300]}
        )
        # The pause between attempts of a retry loop with a deadline, not a wait for an event.
        await asyncio.sleep(min(0.05 * attempt, ingest.member_ttl / 3))


async def _ensure_once(nc: Client, ingest: IngestSettings, partition: int, owns: Owns | None) -> bool:
    """One attempt of ``ensure_partition_consumer``: True when done, False to read the durable again (recreated);
    a race with another replica raises ``ApiError``."""
    subject = f"{ingest.partition_stream}.{durable_name(ingest, partition)}"
    existing = await _consumer_info(nc, subject)
    if existing is None:
        if await create_missing_consumer(nc, ingest, partition, 0, owns) != "exists":
            return True
        existing = await _consumer_info(nc, subject)  # another replica created it meanwhile: check its settings
        if existing is None:
            raise ApiError(_CONSUMER_NOT_FOUND, "deleted again while start-up waited")
    request = _update_request(ingest, partition, existing)
    if request is None:
        return True
    try:
        await _api(nc, f"$JS.API.CONSUMER.CREATE.{subject}", request)
        return True
    except ApiError as exc:
        if exc.code != _CONSUMER_CREATE_FAILED:
            raise
        now = await _consumer_info(nc, subject)
        if now is None or now.get("created") != existing.get("created"):
            raise  # a takeover replaced it under the update
        if owns is not None and not await owns():
            log.warning(
                "partition durable cannot be updated; left to the partition's owner",
                extra={"consumer": durable_name(ingest, partition), "error": str(exc)[:300]},
            )
            return True
        log.warning(
            "partition durable cannot be updated; recreating it after its ack floor",
            extra={"consumer": durable_name(ingest, partition), "error": str(exc)[:300]},
        )
    await recreate_after_floor(nc, ingest, partition, now, 0)
    return False


async def _consumer_info(nc: Client, subject: str) -> dict[str, Any] | None:
    try:
        return await _api(nc, f"$JS.API.CONSUMER.INFO.{subject}")
    except ApiError as exc:
        if exc.code == _CONSUMER_NOT_FOUND:
            return None
        raise


def _with_action(request: dict[str, Any], action: str) -> dict[str, Any]:
    request["action"] = action
    return request


def _update_request(ingest: IngestSettings, partition: int, existing: dict[str, Any]) -> dict[str, Any] | None:
    """The update making ``existing`` (a consumer info) as configured; None when it already is.

    Raises ``ProvisioningError`` when a field the server keeps from creation differs."""
    request = consumer_request(ingest, partition, None)
    config, have = request["config"], existing.get("config", {})
    wrong = [
        f"{field} is {have.get(field, default)!r}, the service needs {config.get(field, default)!r}"
        for field, default in _FIXED.items()
        if have.get(field, default) != config.get(field, default)
    ]
    if wrong:
        raise ProvisioningError(
            f"cannot use consumer {config['durable_name']} on {ingest.partition_stream}: {'; '.join(wrong)} (fixed "
            "when a durable is created: delete it, or set ingest.durable to a new name)"
        )
    for field in _START:
        config.pop(field, None)
        if field in have:
            config[field] = have[field]
    if all(have.get(field) == value for field, value in config.items()):
        return None
    return _with_action(request, "update")


def resumes_at(info: dict[str, Any]) -> int:
    """The first partitioned-stream sequence a durable (its consumer info) would deliver again: after its ack floor,
    and not before where it starts (``deliver_policy: all`` counts as 1)."""
    config = info.get("config", {})
    start = int(config.get("opt_start_seq") or 1) if config.get("deliver_policy") == "by_start_sequence" else 1
    return max(start, int(info.get("ack_floor", {}).get("stream_seq") or 0) + 1)


async def create_partition_consumer(nc: Client, ingest: IngestSettings, partition: int, start: int) -> None:
    """Create the durable to deliver from ``start`` (the caller's highest known ack floor + 1).

    Someone else may have created it first (code 10148: another replica's create landed between this caller's delete
    and its create). That durable is kept when it would deliver nothing before ``start`` again (``resumes_at``);
    one that would (created from the start of the partition, or from an older floor) is deleted and created again
    from ``start``, up to ``_CREATE_ATTEMPTS`` times; then ``ApiError`` 10148.
    """
    subject = f"{ingest.partition_stream}.{durable_name(ingest, partition)}"
    body = _with_action(consumer_request(ingest, partition, start), "create")
    for _ in range(_CREATE_ATTEMPTS):
        try:
            await _api(nc, f"$JS.API.CONSUMER.CREATE.{subject}", body)
            return
        except ApiError as exc:
            if exc.code != _CONSUMER_EXISTS:
                raise
        existing = await _consumer_info(nc, subject)
        if existing is None:
            continue  # deleted again meanwhile
        if resumes_at(existing) >= start:
            return
        log.warning(
            "partition durable created meanwhile from an earlier start; recreating it after the ack floor",
            extra={"partition": partition, "start": start, "resumes_at": resumes_at(existing)},
        )
        with contextlib.suppress(ApiError):
            await _api(nc, f"$JS.API.CONSUMER.DELETE.{subject}")
    raise ApiError(
        _CONSUMER_EXISTS, f"consumer {durable_name(ingest, partition)} kept being created from before {start}"
    )


async def recreate_after_floor(
    nc: Client, ingest: IngestSettings, partition: int, info: dict[str, Any], floor: int
) -> None:
    """Delete the durable (``info``: its consumer info, read before) and create it to deliver from after the highest
    of its ack floor and ``floor`` (the caller's highest seen), not before where it started."""
    with contextlib.suppress(ApiError):  # already deleted: the create follows all the same
        await _api(nc, f"$JS.API.CONSUMER.DELETE.{ingest.partition_stream}.{durable_name(ingest, partition)}")
    await create_partition_consumer(nc, ingest, partition, max(resumes_at(info), floor + 1))


async def create_missing_consumer(
    nc: Client, ingest: IngestSettings, partition: int, floor: int, owns: Owns | None
) -> str:
    """Create a durable found missing, if it is still missing after ``settle_time()`` and ``owns()`` says the
    partition is this replica's; it then delivers from ``floor + 1``.

    Missing mostly means another replica's takeover is between its delete and its create: that create follows within
    a round trip. A create landing while the server is still deleting would leave a durable without its store
    directory, and one landing before the takeover's create would make the takeover meet 10148. So this waits first,
    and creates only for the partition's owner. Returns ``"exists"`` (someone else created it meanwhile),
    ``"created"``, or ``"not_owner"`` (left to the owner; nothing written). ``owns`` None: the caller owns it.
    """
    # The pause that lets a takeover under way finish, not a wait for an event this replica could observe.
    await asyncio.sleep(settle_time())
    if owns is not None and not await owns():
        return "not_owner"
    subject = f"{ingest.partition_stream}.{durable_name(ingest, partition)}"
    if await _consumer_info(nc, subject) is not None:
        return "exists"
    await create_partition_consumer(nc, ingest, partition, floor + 1)
    return "created"


def settle_time() -> float:
    """How long a durable must stay missing before its owner creates it (``create_missing_consumer``)."""
    return _SETTLE


async def unpin(nc: Client, ingest: IngestSettings, partition: int) -> None:
    """Release the partition's pin, whoever holds it: the server pins the next puller with a message to deliver."""
    await _api(
        nc,
        f"$JS.API.CONSUMER.UNPIN.{ingest.partition_stream}.{durable_name(ingest, partition)}",
        {"group": core.PRIORITY_GROUP},
    )


# ---------------------------------------------------------------------------------------------------------------
# Intake


class PartitionedIntake:
    """Pull the partitions this replica owns, each from its own pinned durable, handing batches to ``on_batch``.

    This class keeps the membership and decides which partitions to pull; a ``PartitionPuller`` per partition
    pulls."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: Settings, metrics: Metrics, member: str) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._ingest = settings.ingest
        self._metrics = metrics
        self.member = member
        self._bucket = self._ingest.member_bucket
        self._kv: Any = None
        self._on_batch: Callable[[list[Msg]], Awaitable[None]] | None = None
        self._membership: asyncio.Task[None] | None = None
        self._inbox = f"_CDC_PULL.{NUID().next().decode()}"
        self._running = False
        # With no_wait a request returns as soon as anything is delivered, so a long expiry adds no latency; it only
        # bounds idle polling. Every request renews the pin, so it must come well within pin_timeout.
        self._expires = min(1.0, self._ingest.pin_timeout / 4)
        self._leaving = False
        self._partitions = {
            p: PartitionPuller(
                p,
                nc,
                self._ingest,
                metrics,
                member,
                f"{self._inbox}.{p}",
                self._expires,
                self._count_owned,
                functools.partial(self.owns, p),
            )
            for p in range(self._ingest.partitions)
        }

    # -------------------------------------------------------------------------------------------- lifecycle

    async def start(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        """Join the membership, provision the durables (creating only the missing ones of the partitions the
        membership gives this replica: the others are their owners' to create), and start pulling."""
        self._on_batch = on_batch
        config = KeyValueConfig(bucket=self._bucket, ttl=self._ingest.member_ttl, history=1)
        config.replicas = self._ingest.stream_replicas
        try:
            self._kv = await self._js.create_key_value(config)
        except BadRequestError:  # exists with other settings (an operator's choice): use it as it is
            self._kv = await self._js.key_value(self._bucket)
        await self._kv.put(self.member, b"1")
        # Together: each missing durable waits settle_time() before it is created.
        results = await asyncio.gather(
            *(
                ensure_partition_consumer(self._nc, self._ingest, p, functools.partial(self.owns, p))
                for p in range(self._ingest.partitions)
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                with contextlib.suppress(Exception):  # not staying: give its share back now, not after member_ttl
                    await self._js.purge_stream(f"KV_{self._bucket}", subject=f"$KV.{self._bucket}.{self.member}")
                raise result
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
        """Leave the membership (others take over at their next look), stop pulling, release the pins held.

        Every message the server delivered to a partition's inbox is handed to ``on_batch`` first, as with
        ``PullIntake.stop`` (see ``PartitionPuller``)."""
        self._running = False
        self._leaving = True
        if self._membership is not None:
            self._membership.cancel()
            await asyncio.gather(self._membership, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._js.purge_stream(f"KV_{self._bucket}", subject=f"$KV.{self._bucket}.{self.member}")
        for partition in self._partitions.values():
            partition.running = False
        tasks = [p.task for p in self._partitions.values() if p.task is not None]
        # A pull ends within its expiry; then its batch and what came late are handed over and its pin released.
        _done, late = await asyncio.wait(tasks, timeout=self._expires + 5.0) if tasks else (set(), set())
        for task in late:
            task.cancel()

    def _count_owned(self) -> None:
        self._metrics.partitions_owned.set(len(self.owned()))

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

    async def owns(self, partition: int) -> bool:
        """Whether the membership, read now, gives ``partition`` to this replica (counting this replica in, as a
        round does); False while stopping or when the membership cannot be read."""
        if self._leaving:
            return False
        try:
            members = await self.live_members()
        except Exception as exc:  # disconnected, timeout: not known to be ours, so not ours to create
            log.debug("membership unreadable", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
            return False
        if self.member not in members:
            members.append(self.member)
        return core.assign(self._ingest.partitions, members).get(partition) == self.member

    async def live_members(self) -> list[str]:
        """Keys written within ``member_ttl``: the bucket keeps one entry per key and drops it after the TTL."""
        prefix = f"$KV.{self._bucket}."
        info = await self._js.stream_info(f"KV_{self._bucket}", subjects_filter=prefix + ">")
        return [s[len(prefix) :] for s in (info.state.subjects or {})]

    async def _rebalance(self) -> None:
        assert self._on_batch is not None
        await self._kv.put(self.member, b"1")
        members = await self.live_members()
        if self.member not in members:
            members.append(self.member)
        mine = {p for p, owner in core.assign(self._ingest.partitions, members).items() if owner == self.member}
        self._metrics.partition_members.set(len(members))
        for partition in self._partitions.values():
            if partition.index in mine and partition.idle:
                partition.start(self._on_batch)
            elif partition.index not in mine:
                partition.running = False  # its pull ends after the current request and releases the pin
        self._count_owned()

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
            info = await partition.info()
            backlog += int(info.get("num_pending") or 0)
            floors.append(int(info.get("ack_floor", {}).get("stream_seq") or 0))
        self._metrics.backlog.set(backlog)
        if floors:
            self._metrics.ack_floor.set(min(floors))


# ---------------------------------------------------------------------------------------------------------------
# Pulling one partition


class PartitionPuller:
    """Pulls one partition from its pinned durable while ``running``: accepts a new pin, takes the partition over
    in order when another owner still holds messages, recreates a deleted durable, and releases the pin when done.

    Its subscription on ``<inbox>.*`` takes the messages of every pull request; when pulling ends, what reached it
    after the last request (late under load, or for the rest of a request answered late) is handed to ``on_batch``
    too, as ``PullIntake.stop`` does: dropping it would leave it delivered and unacked until AckWait.
    """

    def __init__(
        self,
        index: int,
        nc: Client,
        ingest: IngestSettings,
        metrics: Metrics,
        member: str,
        inbox: str,
        expires: float,
        on_released: Callable[[], None],
        owns: Owns,
    ) -> None:
        self.index = index
        self._owns = owns
        self.durable = durable_name(ingest, index)
        self._nc = nc
        self._ingest = ingest
        self._metrics = metrics
        self._member = member
        self._inbox = inbox
        self._expires = expires
        self._on_released = on_released
        self.pin: str | None = None  # the pin this replica accepted; None while it holds none
        self.floor = 0  # highest ack floor seen: where a recreated durable resumes
        # Pins of durables this replica deleted in a takeover: their late messages are dropped, as the recreated
        # durable delivers them again in order (processing one would put it ahead of the ones dropped with it).
        self.retired: deque[str] = deque(maxlen=32)
        self.running = False
        self.task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        return self.task is None or self.task.done()

    def start(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        self.running = True
        self.task = asyncio.create_task(self._pull(on_batch), name=f"cdc-pull-p{self.index}")
        log.info("pulling partition", extra={"partition": self.index, "member": self._member})

    async def info(self) -> dict[str, Any]:
        """The durable's consumer info (also records its ack floor)."""
        info = await _api(self._nc, f"$JS.API.CONSUMER.INFO.{self._ingest.partition_stream}.{self.durable}")
        self.floor = max(self.floor, int(info.get("ack_floor", {}).get("stream_seq") or 0))
        return info

    async def _release(self) -> None:
        """After the last pull: release the pin now, so the next owner need not wait for pin_timeout; only if it is
        still ours (the next owner may already have unpinned us and been pinned)."""
        pin, self.pin = self.pin, None
        self._on_released()
        if pin is not None:
            with contextlib.suppress(Exception):
                if await self._pinned_id() == pin:
                    await unpin(self._nc, self._ingest, self.index)

    async def _pull(self, on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def deliver(msg: Msg) -> None:
            queue.put_nowait(msg)

        sub = await self._nc.subscribe(self._inbox + ".*", cb=deliver)
        try:
            # A departed owner's pin would otherwise hold the partition until pin_timeout.
            with contextlib.suppress(Exception):
                await unpin(self._nc, self._ingest, self.index)
            token = 0
            while self.running:
                token += 1
                try:
                    msgs, status = await self._request(queue, f"{self._inbox}.{token}")
                    if status == "423":  # someone else holds the pin: wait as a standby until it is released
                        self.pin = None
                    elif status == "503":  # no durable answered: a takeover under way, or deleted
                        await self._recreate()
                    await self._hand_on(msgs, on_batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # disconnected, timeout: back off briefly and ask again
                    log.warning(
                        "partition pull failed",
                        extra={"partition": self.index, "error": f"{type(exc).__name__}: {exc}"[:300]},
                    )
                    await asyncio.sleep(0.5)
            await self._hand_on_late(sub, queue, on_batch)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            await self._release()

    async def _hand_on(self, msgs: list[Msg], on_batch: Callable[[list[Msg]], Awaitable[None]]) -> None:
        """Pass ``msgs`` on unless they came under a retired pin or a takeover drops them."""
        if self.retired:
            msgs = [m for m in msgs if (m.headers or {}).get(PIN_HEADER) not in self.retired]
        if msgs and await self._accept(msgs):
            for msg in msgs:
                msg.subject = core.original_subject(msg.subject)
            await on_batch(msgs)

    async def _hand_on_late(
        self, sub: Subscription, queue: asyncio.Queue[Msg], on_batch: Callable[[list[Msg]], Awaitable[None]]
    ) -> None:
        """Pulling ended: end interest and pass on everything the server already sent to this inbox.

        ``Subscription.drain`` sends UNSUB, proves by a PING/PONG that everything sent before it was read, and waits
        until the subscription's callback put each of those messages in ``queue``. Status messages (the end of a
        request) are no work. If passing on fails, the messages are nak'ed without delay so the partition's next
        owner takes them at once; a batch that ``on_batch`` took but whose back-pressure wait was cut short is left
        to the engine's drain.
        """
        try:
            await asyncio.wait_for(sub.drain(), 2.0)  # type: ignore[no-untyped-call]
        except Exception as exc:  # disconnected: hand on what came; anything still on its way returns after AckWait
            log.warning(
                "could not end the partition's pull subscription cleanly",
                extra={"partition": self.index, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
        late: list[Msg] = []
        while not queue.empty():
            msg = queue.get_nowait()
            if msg.reply:
                late.append(msg)
        if not late:
            return
        log.info(
            "handing on messages received after the last pull", extra={"partition": self.index, "count": len(late)}
        )
        try:
            await asyncio.wait_for(self._hand_on(late, on_batch), self._expires + 2.0)
        except TimeoutError:
            pass  # the batch was taken; only its back-pressure wait was cut short, and the drain finishes it
        except Exception as exc:
            log.warning(
                "could not pass on, handing back",
                extra={"partition": self.index, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )
            for msg in late:
                with contextlib.suppress(Exception):  # connection gone: the server redelivers after AckWait
                    await msg.nak()

    async def _request(self, queue: asyncio.Queue[Msg], reply: str) -> tuple[list[Msg], str]:
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
        if self.pin is not None:
            body["id"] = self.pin  # renews the pin; a stale one is answered with 423
        await self._nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{ingest.partition_stream}.{self.durable}",
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
                        extra={"partition": self.index, "status": status, "detail": str(msg.headers)[:200]},
                    )
                return msgs, status
        return msgs, ""

    async def _accept(self, msgs: list[Msg]) -> bool:
        """Whether to process ``msgs``; False after a takeover dropped them (they come again, in order)."""
        pins = {(m.headers or {}).get(PIN_HEADER) for m in msgs}
        if pins == {self.pin}:
            return True
        pending = await self._ack_pending()
        if len(pins) == 1 and pending <= len(msgs):
            # A new pin and nobody else holds anything unacked: nothing older can arrive behind these.
            self.pin = pins.pop()
            log.info("partition pinned", extra={"partition": self.index, "member": self._member})
            return True
        self.retired.extend(p for p in pins if p)
        if self.pin:
            self.retired.append(self.pin)
        await self._take_over(pending)
        return False

    async def _take_over(self, pending: int) -> None:
        """Recreate the durable after its ack floor (``recreate_after_floor``): what another owner left unacked comes
        again, before anything newer; what came under the new pin is dropped unacked with the old durable. Only the
        owner by the membership read now does this; a replica whose view is late stops pulling and unpins."""
        if not await self._owns():
            self._stop("not taking it over")
            with contextlib.suppress(Exception):
                await unpin(self._nc, self._ingest, self.index)  # the pin it was just given: the owner pulls at once
            return
        info = await self.info()  # the floor, read before the delete
        await recreate_after_floor(self._nc, self._ingest, self.index, info, self.floor)
        self.pin = None
        self._metrics.partition_takeovers.inc()
        log.info(
            "partition taken over; resuming after its ack floor",
            extra={"partition": self.index, "ack_floor": self.floor, "unacked": pending, "member": self._member},
        )

    def _stop(self, why: str) -> None:
        log.info(f"partition no longer this replica's: {why}", extra={"partition": self.index})
        self.running = False

    async def _recreate(self) -> None:
        """Answered 503, no durable: mostly a takeover is between its delete and its create (by the owner, if this
        replica's view is late). ``create_missing_consumer`` waits, then creates only for the owner."""
        result = await create_missing_consumer(self._nc, self._ingest, self.index, self.floor, self._owns)
        if result == "not_owner":
            self._stop("its durable is missing")
        elif result == "created":
            log.warning("partition durable missing; recreated it", extra={"partition": self.index, "floor": self.floor})

    async def _ack_pending(self) -> int:
        return int((await self.info()).get("num_ack_pending") or 0)

    async def _pinned_id(self) -> str:
        info = await self.info()
        groups = info.get("priority_groups") or []
        return str(groups[0].get("pinned_client_id", "")) if groups else ""
