"""Fault-injection harness: real servers, two replicas, a steady producer, one fault (or all of them), a verifier.

Every run owns its nats-server and redis-server (free ports, a temp dir) because it kills them, and two replicas of
``python -m cdc_service`` with short timings. A producer publishes a known set of Sequin events (three tables,
several companies, a few poison bodies) at a steady pace; the injectors break one thing at a time while events flow.
Afterwards the verifier reads all of ``wa_stream``, the durable's info and the dead-letter stream and answers
with one line: ``events=N faults=K lost=0 duplicated=0 dead_lettered=D``.

``python -m tests.faults.chaos --events 20000`` (``make chaos``) runs every scenario, then all of them together,
then ``partitioned_kill`` on a cluster in partitioned ordering (which also checks per-chat order).
Waiting is always polling with a deadline; the only sleeps are the pacing of the producer and the length of an
outage that a fault is meant to last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy
from nats.js.errors import NotFoundError

from tests.sequin import body
from tests.servers import ServiceProcess
from tools.localservers import NatsServer, Process, RedisServer
from tools.polling import wait_for_async

INPUT = "cdc_events_stream"
OUTPUT = "wa_stream"
DLQ = "cdc_dlq_stream"
DURABLE = "cdc_consumers"
TABLES = ("messages", "chats", "agents")
COMPANIES = 5

SCENARIOS = ("nats_kill", "redis_kill", "replica_kill", "output_reject", "rolling_restart")
ALL = "all"
# Faults of the environment (issue 17), run one at a time with their own timings, not part of ``all``.
ENVIRONMENT = ("frozen_replica", "oom_loop", "edited_durable", "dlq_outage")
ADVISORIES = "cdc_max_deliveries"
# Scenarios that legitimately exhaust deliveries: their messages must then be dead-lettered as max_deliveries
# (accounted for, not lost).
EXHAUSTING = ("frozen_replica", "oom_loop")
# max_deliver 3 as in production, so that a frozen or repeatedly killed replica really burns deliveries.
SCENARIO_SETTINGS: dict[str, dict[str, Any]] = {
    "frozen_replica": {"ingest.max_deliver": 3},
    # Two kills of the same messages make them run out. Each message waits about a second in the batch buffer (the
    # batch does not fill at this rate) before it is worked on, so a kill catches messages in hand, as an OOM kill
    # mid-batch does: without it the service settles in milliseconds and a kill finds almost nothing to spend.
    "oom_loop": {"ingest.max_deliver": 2, "ingest.batch_size": 4096, "ingest.batch_wait_ms": 1000},
    "dlq_outage": {"publish.max_hold": 2},
}
# The OOM loop restarts one pod: with a second replica, redeliveries would mostly go to the healthy one.
SCENARIO_REPLICAS = {"oom_loop": 1}
# Runs on a cluster in ingest.ordering = partitioned (not part of ALL, which runs in replica mode): a replica that
# owns partitions SIGKILL'd while it has messages in flight, its successor started; per-chat order is checked too.
PARTITIONED_KILL = "partitioned_kill"
PARTITION_STREAM = "cdc_events_partitioned"
PARTITIONS = 4
# Takeover within member_ttl + member_ttl/3 = 2 s; AckWait well above it, so that the survivor takes over (and
# resumes from the ack floor) before the server redelivers anything on its own.
PARTITIONED_SETTINGS: dict[str, Any] = {
    "ingest.ordering": "partitioned",
    "ingest.partitions": PARTITIONS,
    "ingest.partition_stream": PARTITION_STREAM,
    "ingest.member_ttl": 1.5,
    "ingest.pin_timeout": 2,
    "ingest.ack_wait": 10,
}

# Short timings so that a run takes seconds: AckWait 2 s, PubAck wait 0.5 s, retries every ≤ 0.3 s.
# max_deliver is raised from 3 so that a message caught by several faults in a row (a killed replica, then a
# draining one) is not dead-lettered as max_deliveries: the suite checks that only poison reaches the DLQ.
SERVICE_SETTINGS: dict[str, Any] = {
    "ingest.ack_wait": 2,
    "ingest.max_deliver": 10,
    "ingest.consumer_check_interval": 1,
    "publish.timeout": 0.5,
    "dedup.claim_ttl": 1.0,  # between publish.timeout and AckWait
    "publish.retry_initial": 0.1,
    "publish.retry_max": 0.3,
    "nats.reconnect_wait": 0.2,
    "nats.connect_timeout": 1,
    "redis.socket_timeout": 0.2,
    "redis.retry_interval": 0.5,
    "shutdown.grace_seconds": 5,
    "workers.pool_size": 4,
    "log.summary_interval": 5,
}


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class Event:
    subject: str
    data: bytes
    event_id: str | None  # None: poison, must end up in the dead-letter stream


def _poison(i: int, company: str) -> bytes:
    kind = i % 3
    if kind == 0:
        return b'{"record": {"id": %d, "company_id": "%s"' % (i, company.encode())  # invalid_json (truncated)
    doc = body("messages", lsn=i + 1, company_id=company, message_id=f"m{i}", agent_id=f"a{i % 40}")
    if kind == 1:
        del doc["metadata"]  # missing_field
    else:
        doc["record"]["company_id"] = "someone-else"  # tenant_mismatch
    return orjson.dumps(doc)


def make_events(count: int, poison: int) -> list[Event]:
    """``count`` events (``poison`` of them poison, spread evenly); every good one has a distinct ``event_id``."""
    poison_at = {int((k + 0.5) * count / poison) for k in range(poison)} if poison else set()
    out: list[Event] = []
    for i in range(count):
        table = TABLES[i % len(TABLES)]
        company = f"co{i % COMPANIES}"
        subject = f"cdc.{company}.{table}"
        if i in poison_at:
            out.append(Event(subject, _poison(i, company), None))
            continue
        ids: dict[str, Any] = {"company_id": company, "agent_id": f"a{i % 40}"}
        if table == "messages":
            ids.update(message_id=f"m{i}", chat_id=f"c{i % 200}")
            pk = f"m{i}"
        elif table == "chats":
            ids.update(chat_id=f"c{i}")
            pk = f"c{i}"
        else:
            ids.update(agent_id=f"a{i}")
            pk = f"a{i}"
        out.append(
            Event(subject, orjson.dumps(body(table, lsn=i + 1, **ids)), f"{i + 1}:chatdb:{company}:{table}:{pk}")
        )
    return out


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    scenario: str
    events: int
    faults: int
    lost: list[str]
    duplicated: dict[str, int]
    unexpected: list[str]
    dead_lettered: int
    poison: int
    unexpected_dead_letters: list[str]
    exhausted: list[str]  # good events dead-lettered as max_deliveries (only in EXHAUSTING scenarios)
    # Good events both in wa_stream and dead-lettered as max_deliveries: a replica killed between an event's PubAck
    # and its Redis marker leaves nothing that tells the advisory handler it was published. Not a duplicate in
    # wa_stream; a replay of the dead letter is dropped by the dedup windows.
    also_dead_lettered: list[str]
    num_pending: int
    num_ack_pending: int
    num_redelivered: int
    wall: float
    notes: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    workdir: str = ""
    inversions: int | None = None  # per-chat LSN inversions in wa_stream; checked in the partitioned scenario

    @property
    def partitioned(self) -> bool:
        return self.scenario == PARTITIONED_KILL

    @property
    def summary(self) -> str:
        return (
            f"events={self.events} faults={self.faults} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} dead_lettered={self.dead_lettered}"
            + (f" max_deliveries={len(self.exhausted)}" if self.exhausted else "")
            + (f" also_published={len(self.also_dead_lettered)}" if self.also_dead_lettered else "")
            + (f" inversions={self.inversions}" if self.inversions is not None else "")
        )

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and not self.unexpected
            and not self.unexpected_dead_letters
            and self.dead_lettered == self.poison + len(self.exhausted)
            and self.num_pending == 0
            and self.num_ack_pending == 0
            and (not self.partitioned or self.inversions == 0)
        )

    def fault_problems(self) -> list[str]:
        """Ways in which the injected fault did not do what it should (so a pass would prove nothing)."""
        problems = []
        expected_faults = {"rolling_restart": 2, "oom_loop": 4, ALL: len(SCENARIOS) + 1}.get(self.scenario, 1)
        if self.faults != expected_faults:
            problems.append(f"{self.faults} faults injected, expected {expected_faults}")
        if self.scenario in ("output_reject", ALL):
            if self.stats.get("reject_publish_errors", 0) <= 0:
                problems.append("the output never refused a publish")
            if self.stats.get("reject_max_redelivered", 0) != 0:
                problems.append("messages were redelivered while the output refused publishes (AckWait expired)")
        # In pull mode a frozen replica holds only what it fetched before it froze, often nothing: no burnt delivery.
        pull_frozen = self.scenario == "frozen_replica" and self.stats.get("pull", 0)
        if self.scenario in EXHAUSTING and self.stats.get("advisories", 0) <= 0 and not pull_frozen:
            problems.append("no message ran out of deliveries: the fault did not burn any")
        if self.scenario == "edited_durable" and self.stats.get("drift_restored", 0) <= 0:
            problems.append("the edited durable was not restored")
        if self.scenario == "dlq_outage" and self.stats.get("dlq_outage_poison", 0) <= 0:
            problems.append("no poison arrived while the dead-letter stream was missing")
        if self.partitioned:
            if self.stats.get("killed_owned", 0) <= 0:
                problems.append("the killed replica owned no partition")
            if self.stats.get("owned_at_end") != PARTITIONS:
                problems.append(f"{self.stats.get('owned_at_end')} of {PARTITIONS} partitions owned at the end")
        if self.scenario in ("rolling_restart", ALL):
            for index in (0, 1):
                if self.stats.get(f"sigterm_exit_{index}") != 0:
                    problems.append(f"replica{index} exited {self.stats.get(f'sigterm_exit_{index}')} on SIGTERM")
        return problems

    def evidence(self) -> str:
        return (
            f"{self.scenario}: {self.summary} poison={self.poison} pending={self.num_pending} "
            f"ack_pending={self.num_ack_pending} redelivered={self.num_redelivered} "
            f"lost[:10]={self.lost[:10]} duplicated[:10]={list(self.duplicated.items())[:10]} "
            f"inversions={self.inversions} unexpected[:10]={self.unexpected[:10]} "
            f"unexpected_dlq[:10]={self.unexpected_dead_letters[:10]} "
            f"exhausted={len(self.exhausted)} also_dead_lettered[:10]={self.also_dead_lettered[:10]} "
            f"notes={self.notes} stats={self.stats} fault_problems={self.fault_problems()} logs={self.workdir}"
        )


# ------------------------------------------------------------------------------------------------ the cluster


class Chaos:
    """Owns the servers, the replicas, the producer and the injectors of one run. Use ``async with``."""

    def __init__(self, workdir: Path, settings: dict[str, Any] | None = None, replicas: int = 2) -> None:
        self.workdir = workdir
        self.settings = {**SERVICE_SETTINGS, **(settings or {})}
        self.partitioned = self.settings.get("ingest.ordering") == "partitioned"
        # The durables that carry the events: the shared one, or one per partition on the partitioned stream.
        self.durables = (
            [(PARTITION_STREAM, f"{DURABLE}_p{p}") for p in range(int(self.settings["ingest.partitions"]))]
            if self.partitioned
            else [(INPUT, DURABLE)]
        )
        self.replica_count = replicas
        self.nats = NatsServer(workdir)
        self.redis = RedisServer(workdir)
        self.replicas: list[ServiceProcess] = []
        self.retired: list[Process] = []
        self.nc: Client | None = None
        self.published = 0
        self.faults = 0
        self.notes: list[str] = []
        self.stats: dict[str, float] = {}
        self.extra_poison = 0  # poison published by an injector (not in the producer's list)
        self.stats["pull"] = 1.0 if self.settings.get("ingest.mode") == "pull" else 0.0
        self._starts = 0

    # -------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Chaos:
        try:
            await asyncio.to_thread(self.nats.start)
            await asyncio.to_thread(self.redis.start)
            for i in range(self.replica_count):
                self.replicas.append(self._new_replica(i))
            await asyncio.gather(*(asyncio.to_thread(r.wait_ready, 30) for r in self.replicas))
            self.nc = await self._connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), 5)
            except Exception:
                pass
            self.nc = None
        for proc in [*self.replicas, *self.retired, self.redis, self.nats]:
            try:
                await asyncio.to_thread(proc.stop, 10)
            except Exception:
                pass

    def _new_replica(self, index: int) -> ServiceProcess:
        self._starts += 1
        # Own session: a replica frozen by a fault is resumed by nothing but the fault (see ServiceProcess).
        svc = ServiceProcess(
            self.workdir,
            self.nats.url,
            self.redis.url,
            name=f"replica{index}-{self._starts}",
            new_session=True,
            **self.settings,
        )
        svc.start()
        return svc

    async def _connect(self) -> Client:
        async def quiet(exc: Exception) -> None:
            pass  # refused (re)connects while nats-server is down are the point of the fault

        return await nats.connect(
            self.nats.url,
            error_cb=quiet,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=1,
            name="chaos",
        )

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(timeout=2)

    async def _replicas_ready(self, timeout: float = 30) -> None:
        await asyncio.gather(*(asyncio.to_thread(r.wait_ready, timeout) for r in self.replicas))

    # -------------------------------------------------------------------- producer

    async def produce(self, events: list[Event], rate: float, hold_back: asyncio.Event | None = None) -> None:
        """Publish ``events`` to the input stream at ``rate``/s, each retried (same Nats-Msg-Id) until stored.

        With ``hold_back``, the last 10 % trickle out at a twentieth of the rate until it is set, so that faults
        that take longer than the main flow still happen while events arrive.
        """
        nc = await self._connect()
        try:
            js = nc.jetstream(timeout=1)
            tail = int(len(events) * 0.9) if hold_back is not None else len(events)
            trickle = max(rate / 20, 10.0)
            next_at = time.monotonic()
            for i, event in enumerate(events):
                ahead = next_at - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)  # pacing of a steady producer, not a wait for a condition
                await self._publish_stored(js, i, event)
                self.published = i + 1
                slow = i >= tail and hold_back is not None and not hold_back.is_set()
                next_at = max(next_at + 1 / (trickle if slow else rate), time.monotonic() - 0.5)
        finally:
            await nc.close()

    async def _publish_stored(self, js: JetStreamContext, i: int, event: Event, timeout: float = 60) -> None:
        headers = {"Nats-Msg-Id": f"chaos-{i}"}  # a retried publish is stored once in the input stream

        async def attempt() -> bool:
            await js.publish(event.subject, event.data, headers=headers)
            return True

        await wait_for_async(attempt, timeout, 0.05, what=f"input publish {i}")

    async def wait_published(self, count: int, timeout: float = 120) -> None:
        async def reached() -> bool:
            return self.published >= count

        await wait_for_async(reached, timeout, 0.01, what=f"{count} events published")

    # -------------------------------------------------------------------- faults

    async def kill_nats(self, outage: float = 1.0) -> None:
        """SIGKILL nats-server, keep it down for ``outage`` s, restart it on the same port and store directory."""
        delivered = await self._delivered()
        await asyncio.to_thread(self.nats.kill)
        self.faults += 1
        killed_at = time.monotonic()
        await asyncio.sleep(outage)  # the length of the outage
        await asyncio.to_thread(self.nats.start)
        await self._replicas_ready()
        await self._acked_through(delivered)
        self.notes.append(f"nats-server SIGKILL, down {outage:.1f}s; acked through {time.monotonic() - killed_at:.1f}s")

    async def kill_redis(self, outage: float = 1.0) -> None:
        """SIGKILL redis-server; restart it empty (no persistence) on the same port."""
        await asyncio.to_thread(self.redis.kill)
        self.faults += 1
        await asyncio.sleep(outage)  # the length of the outage
        await asyncio.to_thread(self.redis.start)

    async def kill_replica(self, index: int = 0, mid_batch_timeout: float = 2.0) -> None:
        """SIGKILL one replica while it has messages in flight (if seen within the timeout), then start a new one."""
        victim = self.replicas[index]
        if self.partitioned:  # a replica that owns nothing would prove nothing: wait until the spread gave it some
            await wait_for_async(
                lambda: asyncio.to_thread(victim.metric, "cdc_consumer_partitions_owned"),
                30,
                what="victim owns partitions",
            )
            self.stats["killed_owned"] = await asyncio.to_thread(victim.metric, "cdc_consumer_partitions_owned")

        async def inflight_now() -> float:
            return await asyncio.to_thread(victim.metric, "cdc_consumer_inflight_messages")

        try:
            inflight = await wait_for_async(inflight_now, mid_batch_timeout, 0.005, what="victim holding messages")
        except TimeoutError:
            inflight = 0.0  # nothing in flight within the timeout: killed all the same (an idle kill still counts)
        await asyncio.to_thread(victim.kill)
        self.faults += 1
        killed_at = time.monotonic()
        delivered = await self._delivered()
        self.stats["killed_inflight"] = inflight
        self.retired.append(victim)
        self.replicas[index] = self._new_replica(index)
        await self._replicas_ready()
        await self._acked_through(delivered)
        recovery = time.monotonic() - killed_at
        self.notes.append(f"replica{index} SIGKILL with inflight={inflight:.0f}; acked through it in {recovery:.1f}s")

    async def _delivered(self, timeout: float = 30) -> list[int]:
        """The last delivered stream sequence of each durable (polled: a partition durable may be being recreated
        in a takeover at this moment)."""
        js = self.js

        async def read() -> list[int]:  # never empty, so truthy; an error counts as "not yet" in _poll
            infos = [await js.consumer_info(stream, durable) for stream, durable in self.durables]
            return [int(i.delivered.stream_seq or 0) if i.delivered else 0 for i in infos]

        return list(await wait_for_async(read, timeout, what="delivered sequences"))

    async def _acked_through(self, seqs: list[int], timeout: float = 30) -> None:
        """Poll until each durable's ack floor reaches its ``seqs`` entry: whatever was delivered before is settled."""
        js = self.js

        async def reached() -> bool:
            for (stream, durable), seq in zip(self.durables, seqs, strict=True):
                info = await js.consumer_info(stream, durable)
                floor = int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0
                if not (floor >= seq or (info.num_ack_pending == 0 and info.num_pending == 0)):
                    return False
            return True

        await wait_for_async(reached, timeout, what=f"ack floors at stream seqs {seqs}")

    async def rolling_restart(self) -> None:
        """SIGTERM each replica in turn, wait for its exit, start its successor and wait until it is ready."""
        for index, old in enumerate(list(self.replicas)):
            old.signal(15)
            code = await asyncio.to_thread(old.wait, float(self.settings["shutdown.grace_seconds"]) + 10)
            self.faults += 1
            self.notes.append(f"replica{index} SIGTERM exit={code}")
            self.stats[f"sigterm_exit_{index}"] = code
            self.retired.append(old)
            self.replicas[index] = self._new_replica(index)
            await self._replicas_ready()

    async def reject_output(self, hold: float | None = None) -> None:
        """Make ``wa_stream`` refuse publishes (max_msgs = current count, discard new) for > 2 x AckWait, then relieve.

        Returns once the limit is lifted. ``cdc_consumer_publish_errors_total`` must have grown meanwhile.
        """
        hold = hold if hold is not None else 2 * float(self.settings["ingest.ack_wait"]) + 1.0
        js = self.js
        # what an earlier fault left for redelivery (a killed replica's messages) is settled first, so that the
        # redeliveries watched below are the ones this fault causes
        await self._acked_through(await self._delivered())
        errors_before = await self._publish_errors()
        info = await js.stream_info(OUTPUT)
        config = info.config
        config.max_msgs = int(info.state.messages)
        config.discard = DiscardPolicy.NEW
        await js.update_stream(config)
        self.faults += 1
        redelivered = 0
        try:
            end = time.monotonic() + hold
            while time.monotonic() < end:  # the outage lasts ``hold`` s; meanwhile watch for redeliveries
                info = await js.consumer_info(INPUT, DURABLE)
                redelivered = max(redelivered, int(info.num_redelivered or 0))
                await asyncio.sleep(min(0.2, max(0.0, end - time.monotonic())))
        finally:
            info = await js.stream_info(OUTPUT)
            config = info.config
            config.max_msgs = -1
            config.discard = DiscardPolicy.OLD
            await js.update_stream(config)
        errors = await self._publish_errors() - errors_before
        self.stats["reject_publish_errors"] = errors
        self.stats["reject_max_redelivered"] = redelivered
        self.notes.append(f"output rejected {hold:.1f}s: publish_errors+={errors:.0f}, max redelivered={redelivered}")

    async def _publish_errors(self) -> float:
        values = await asyncio.gather(
            *(asyncio.to_thread(r.metric, "cdc_consumer_publish_errors_total") for r in self.replicas)
        )
        return float(sum(values))

    async def freeze_replica(self, index: int = 0, freeze: float | None = None) -> None:
        """SIGSTOP one replica for longer than its messages' deliveries last, then SIGKILL it (as kubelet would
        after failed probes) and start a successor. Measures the healthy replica's rate meanwhile (issue 17 item 6).
        """
        ack_wait, max_deliver = float(self.settings["ingest.ack_wait"]), int(self.settings["ingest.max_deliver"])
        freeze = freeze if freeze is not None else ack_wait * (max_deliver + 1) + 1
        victim, healthy = self.replicas[index], self.replicas[1 - index] if len(self.replicas) > 1 else None
        before = await asyncio.to_thread(healthy.metric, "cdc_consumer_events_total") if healthy else 0.0
        produced = self.published
        victim.signal(19)  # SIGSTOP
        self.faults += 1
        started = time.monotonic()
        await asyncio.sleep(freeze)  # the length of the freeze
        elapsed = time.monotonic() - started
        if healthy is not None:
            after = await asyncio.to_thread(healthy.metric, "cdc_consumer_events_total")
            self.stats["healthy_rate"] = (after - before) / elapsed
            self.stats["offered_rate"] = (self.published - produced) / elapsed
        await asyncio.to_thread(victim.kill)
        self.retired.append(victim)
        self.replicas[index] = self._new_replica(index)
        await self._replicas_ready()
        self.stats["advisories"] = await self._count(ADVISORIES)
        self.notes.append(
            f"replica{index} frozen {elapsed:.1f}s then SIGKILL; healthy replica settled "
            f"{self.stats.get('healthy_rate', 0):.0f}/s of {self.stats.get('offered_rate', 0):.0f}/s offered; "
            f"advisories={self.stats['advisories']:.0f}"
        )

    async def crash_loop(self, index: int = 0, kills: int = 4) -> None:
        """Stand-in for an OOM-kill loop: SIGKILL one replica each time it holds messages, restart it like a pod.

        Each kill hands back what the replica held (up to max_ack_pending) and spends one delivery of each.
        """
        ack_wait = float(self.settings["ingest.ack_wait"])
        for kill in range(kills):
            victim = self.replicas[index]

            started = time.monotonic()

            async def holding(again: bool = kill > 0, since: float = started) -> bool:
                # The server's view: delivered and not acked (the only replica holds them, in its batch buffer). After
                # the first kill, prefer to wait until redelivered messages are held: killing the successor then spends
                # another delivery of the same messages, so that some run out (what an OOM loop does).
                info = await self.js.consumer_info(INPUT, DURABLE)
                if again and time.monotonic() - since < 2 * ack_wait + 2.0:
                    return info.num_redelivered > 0
                return info.num_ack_pending > 0

            try:
                await wait_for_async(holding, 10, 0.01, what="messages in flight")
            except TimeoutError:
                pass  # the flow is over: an idle pod is OOM-killed too (the restart still counts as a fault)
            await asyncio.to_thread(victim.kill)
            self.faults += 1
            self.retired.append(victim)
            self.replicas[index] = self._new_replica(index)
            await self._replicas_ready()
        self.stats["advisories"] = await self._count(ADVISORIES)
        self.notes.append(f"replica{index} killed {kills} times while holding messages")

    async def edit_durable(self) -> None:
        """Narrow the durable's filter to one tenant and shorten its ack_wait, as an operator might by mistake."""
        js = self.js
        config = (await js.consumer_info(INPUT, DURABLE)).config
        config.filter_subject = "cdc.co0.*"
        config.ack_wait = 1.0
        await js.add_consumer(INPUT, config)
        self.faults += 1
        edited = time.monotonic()

        async def restored() -> bool:
            info = await js.consumer_info(INPUT, DURABLE)
            # cdc.> is the configured cdc.*.* as provisioning widens it (subjects with a literal wildcard token)
            return info.config.filter_subject in ("cdc.*.*", "cdc.>") and info.config.ack_wait == float(
                self.settings["ingest.ack_wait"]
            )

        await wait_for_async(restored, 30, what="durable restored")
        drift = await asyncio.gather(
            *(asyncio.to_thread(r.metric, "cdc_consumer_consumer_drift_total") for r in self.replicas)
        )
        self.stats["drift_restored"] = sum(drift)
        self.notes.append(f"durable edited; restored after {time.monotonic() - edited:.1f}s")

    async def dlq_outage(self, outage: float | None = None) -> None:
        """Make the dead-letter stream refuse publishes (full, discard=new) for > 2 x AckWait while poison arrives,
        then relieve it. (Deleting it would be the other outage; it would also delete the earlier dead letters that
        the verifier counts.)"""
        outage = outage if outage is not None else 2 * float(self.settings["ingest.ack_wait"]) + 2.0
        js = self.js
        info = await js.stream_info(DLQ)
        config = info.config
        config.max_msgs = max(1, int(info.state.messages))
        config.discard = DiscardPolicy.NEW
        if not info.state.messages:  # an empty stream cannot be "full": hold one placeholder that it must refuse
            raise RuntimeError("dlq_outage needs a dead letter before the outage; inject it later")
        await js.update_stream(config)
        self.faults += 1
        produced = self.published
        nc = await self._connect()
        try:
            poison_js = nc.jetstream(timeout=2)
            for i in range(2):  # poison during the outage, whatever the producer's pacing
                await poison_js.publish("cdc.co1.messages", b'{"outage poison %d"' % i)
        finally:
            await nc.close()
        self.extra_poison += 2
        await asyncio.sleep(outage)  # the length of the outage
        config.max_msgs = -1
        config.discard = DiscardPolicy.OLD
        await js.update_stream(config)
        self.stats["dlq_outage_poison"] = 2
        self.notes.append(f"dead-letter stream full {outage:.1f}s; {self.published - produced} events meanwhile")

    async def _count(self, stream: str) -> float:
        try:
            return float((await self.js.stream_info(stream)).state.messages)
        except NotFoundError:
            return 0.0

    async def inject(self, scenario: str) -> None:
        if scenario == "frozen_replica":
            await self.freeze_replica(0)
            return
        if scenario == "oom_loop":
            await self.crash_loop(0)
            return
        if scenario == "edited_durable":
            await self.edit_durable()
            return
        if scenario == "dlq_outage":
            await self.dlq_outage()
            return
        if scenario == "nats_kill":
            await self.kill_nats()
        elif scenario == "redis_kill":
            await self.kill_redis()
        elif scenario in ("replica_kill", PARTITIONED_KILL):
            await self.kill_replica(0)
        elif scenario == "rolling_restart":
            await self.rolling_restart()
        elif scenario == "output_reject":
            await self.reject_output()
        else:
            raise ValueError(f"unknown scenario {scenario!r}")

    # -------------------------------------------------------------------- verification

    async def verify(self, scenario: str, events: list[Event], wall_start: float, settle: float = 60) -> Result:
        js = self.js

        async def consumers() -> list[Any]:
            return [await js.consumer_info(stream, durable) for stream, durable in self.durables]

        async def settled() -> Any:
            infos = await consumers()
            return infos if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos) else None

        try:
            infos = await wait_for_async(settled, settle, 0.05, what="consumers settled")
        except TimeoutError:
            infos = await wait_for_async(consumers, 10, what="consumer info")

        async def advisories_handled() -> bool:
            # messages that ran out of deliveries are dead-lettered from their advisories (cdc_service.advisories)
            try:
                adv = await js.consumer_info(ADVISORIES, f"{DURABLE}_max_deliveries")
            except NotFoundError:
                return True
            return adv.num_pending == 0 and adv.num_ack_pending == 0

        try:
            await wait_for_async(advisories_handled, settle, 0.1, what="advisories handled")
        except TimeoutError:
            self.notes.append("advisories not all handled at the deadline")
        # advisories come one AckWait after a message's last delivery: count them once everything settled
        self.stats["advisories"] = await self._count(ADVISORIES)
        if self.partitioned:

            async def owned() -> float:
                values = await asyncio.gather(
                    *(asyncio.to_thread(r.metric, "cdc_consumer_partitions_owned") for r in self.replicas)
                )
                return float(sum(values))

            async def all_owned() -> bool:
                return await owned() == len(self.durables)

            with contextlib.suppress(TimeoutError):  # a shortfall is reported by fault_problems
                await wait_for_async(all_owned, 15, what="every partition owned by a live replica")
            self.stats["owned_at_end"] = await owned()
            # Events the killed owner had published but not acked come again from the ack floor and are dropped by
            # de-duplication (Redis marker or JetStream's window): > 0 shows the run exercised that case.
            duplicate = {"result": "duplicate"}
            dropped = await asyncio.gather(
                *(asyncio.to_thread(r.metric, "cdc_consumer_events_total", duplicate) for r in self.replicas)
            )
            self.stats["duplicates_dropped"] = float(sum(dropped))
            self.notes.append(f"duplicates dropped after the takeover={sum(dropped):.0f}")
        redeliveries = await asyncio.gather(
            *(asyncio.to_thread(r.metric, "cdc_consumer_redeliveries_total") for r in self.replicas)
        )
        self.notes.append(f"redeliveries seen by the live replicas={sum(redeliveries):.0f}")
        output = [orjson.loads(m.data) for m in await self._read_all(OUTPUT, "wa.>")]
        ids = [str(p["event_id"]) for p in output]
        dlq_bodies = await self._read_dlq()
        expected = [e.event_id for e in events if e.event_id is not None]
        poison = {e.data for e in events if e.event_id is None}
        counts = Counter(ids)
        expected_set = set(expected)
        by_body = {e.data: e.event_id for e in events if e.event_id is not None}
        exhausted = [
            str(by_body[data])
            for data, reason in dlq_bodies
            if data in by_body and reason == "max_deliveries" and scenario in EXHAUSTING
        ]
        accounted = set(counts) | set(exhausted)
        return Result(
            scenario=scenario,
            events=len(events),
            faults=self.faults,
            lost=[i for i in expected if i not in accounted],
            duplicated={i: n for i, n in counts.items() if n > 1},
            unexpected=sorted(i for i in counts if i not in expected_set),
            dead_lettered=len(dlq_bodies),
            poison=sum(1 for e in events if e.event_id is None) + self.extra_poison,
            unexpected_dead_letters=[
                reason
                for data, reason in dlq_bodies
                if data not in poison and not data.startswith(b'{"outage poison') and by_body.get(data) not in exhausted
            ],
            exhausted=exhausted,
            also_dead_lettered=[i for i in exhausted if i in counts],
            num_pending=sum(int(i.num_pending or 0) for i in infos),
            num_ack_pending=sum(int(i.num_ack_pending or 0) for i in infos),
            num_redelivered=sum(int(i.num_redelivered or 0) for i in infos),
            wall=time.monotonic() - wall_start,
            notes=list(self.notes),
            stats=dict(self.stats),
            workdir=str(self.workdir),
            inversions=inversions(output) if self.partitioned else None,
        )

    async def _read_all(self, stream: str, subject: str, timeout: float = 60) -> list[Msg]:
        """Every message of ``stream``, read once with an ordered consumer."""
        js = self.js
        try:
            total = int((await js.stream_info(stream)).state.messages)
        except NotFoundError:
            return []
        if total == 0:
            return []
        out: list[Msg] = []
        done = asyncio.Event()

        async def on_message(msg: Msg) -> None:
            out.append(msg)
            if len(out) >= total:
                done.set()

        sub = await js.subscribe(
            subject,
            stream=stream,
            cb=on_message,
            ordered_consumer=True,
            pending_msgs_limit=total + 1024,
            pending_bytes_limit=1024 * 1024 * 1024,
        )
        try:
            await asyncio.wait_for(done.wait(), timeout)
        finally:
            await sub.unsubscribe()
        return out

    async def _read_dlq(self) -> list[tuple[bytes, str]]:
        return [(m.data, (m.headers or {}).get("Cdc-Error-Reason", "")) for m in await self._read_all(DLQ, "dlq.>")]


def inversions(output: list[dict[str, Any]]) -> int:
    """Events of a chat in ``wa_stream`` (stream order) whose LSN is below one stored before it. The LSN leads the
    event id; an event without a chat (agents) has no chat order to keep."""
    highest: dict[str, int] = {}
    count = 0
    for payload in output:
        chat = (payload.get("row_data") or {}).get("chat_id")
        if chat is None:
            continue
        lsn = int(str(payload["event_id"]).split(":", 1)[0])
        if lsn < highest.get(chat, 0):
            count += 1
        highest[chat] = max(highest.get(chat, 0), lsn)
    return count


# ------------------------------------------------------------------------------------------------ one run


async def run_scenario(
    scenario: str,
    workdir: Path,
    events: int = 2000,
    rate: float = 400.0,
    poison: int = 5,
    at: float = 0.3,
    settings: dict[str, Any] | None = None,
) -> Result:
    """Start a fresh cluster, produce ``events`` at ``rate``/s, inject ``scenario`` (or ``all``, one after the
    other) once ``at`` of them were published, then verify. ``settings`` override the service settings."""
    scenarios = list(SCENARIOS) if scenario == ALL else [scenario]
    batch = make_events(events, poison)
    overrides = {
        **(PARTITIONED_SETTINGS if scenario == PARTITIONED_KILL else {}),
        **SCENARIO_SETTINGS.get(scenario, {}),
        **(settings or {}),
    }
    async with Chaos(workdir, overrides, replicas=SCENARIO_REPLICAS.get(scenario, 2)) as chaos:
        wall_start = time.monotonic()
        faults_done = asyncio.Event()

        async def injector() -> None:
            try:
                for k, name in enumerate(scenarios):
                    share = at + (0.8 - at) * k / len(scenarios)
                    await chaos.wait_published(int(events * share))
                    await chaos.inject(name)
            finally:
                faults_done.set()

        tasks = [asyncio.create_task(chaos.produce(batch, rate, faults_done)), asyncio.create_task(injector())]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return await chaos.verify(scenario, batch, wall_start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20000, help="events per scenario (default 20000)")
    parser.add_argument("--rate", type=float, default=2000.0, help="producer events per second (default 2000)")
    parser.add_argument("--poison", type=int, default=10, help="poison events per scenario (default 10)")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIOS, *ENVIRONMENT, ALL, PARTITIONED_KILL],
        help="default: each, then all, then partitioned_kill",
    )
    parser.add_argument("--mode", choices=["push", "pull"], default="push", help="ingest.mode of the replicas")
    parser.add_argument("--keep", action="store_true", help="keep the working directories (logs) even on success")
    parser.add_argument("--verbose", action="store_true", help="also print the details of each run to stderr")
    args = parser.parse_args(argv)
    failed = 0
    for scenario in args.scenario or [*SCENARIOS, *ENVIRONMENT, ALL, PARTITIONED_KILL]:
        workdir = Path(tempfile.mkdtemp(prefix=f"chaos-{scenario}-"))
        result = asyncio.run(
            run_scenario(scenario, workdir, args.events, args.rate, args.poison, settings={"ingest.mode": args.mode})
        )
        print(f"{scenario:<16} {result.summary} wall={result.wall:.1f}s", flush=True)
        if "healthy_rate" in result.stats:
            print(f"  {result.notes[0]}", flush=True)
        if not result.ok or result.fault_problems():
            failed += 1
            print(f"  FAILED {result.evidence()}", file=sys.stderr, flush=True)
        elif args.verbose:
            print(f"  {result.evidence()}", file=sys.stderr, flush=True)
        if result.ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
