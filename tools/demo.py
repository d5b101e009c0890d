"""`make demo`: the whole path on one screen, in about ten seconds, then everything it started is stopped.

1. Starts a nats-server (JetStream) and a redis-server from the venv on free loopback ports of its own (never the
   usual 4222/6379; a server already running there is not touched), data and logs in a temporary directory.
2. Runs ``python -m cdc_service`` against them and waits until it is ready.
3. Follows ``wa.>`` in ``wa_stream`` and prints each enriched event as it is stored.
4. Publishes Sequin change events for ``messages``, ``chats`` and ``agents``; then the same ``messages`` event again
   (a redelivery: deduplicated, stored once), a poison message (``tenant_mismatch``: dead-lettered) and one more
   message.
5. Prints what the service counted and ``python -m cdc_service dlq list``.
6. Stops the service (SIGTERM, it drains), then the servers, each by its pid, and exits 0 (1 if something did not
   show up in time, with the service's log tail).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cdc_service.config import ENV_PREFIX, SECRET_KEYS  # noqa: E402
from cdc_service.testing import sample_record, sequin_message  # noqa: E402
from tools.localservers import NatsServer, P, Process, ProcessSet, RedisServer, free_port  # noqa: E402
from tools.polling import GiveUp, wait_for, wait_for_async  # noqa: E402

BUDGET = 30.0  # seconds for start-up and the demo itself; stopping comes after
INPUT, OUTPUT, DLQ, DURABLE = "cdc_events_stream", "wa_stream", "cdc_dlq_stream", "cdc_consumers"
STARTED = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def remaining() -> float:
    return max(0.5, BUDGET - (time.monotonic() - STARTED))


# ---------------------------------------------------------------------------------------------------------------
# Sample Sequin events (the sample rows of cdc_service.testing; docs/schemas.md §1.3)


def sequin(
    table: str, record: dict[str, Any], *, action: str = "insert", lsn: int | None, idx: int | None = None
) -> bytes:
    return json.dumps(sequin_message(table, record, action=action, lsn=lsn, idx=idx)).encode()


MESSAGE = sample_record("messages")
CHAT = sample_record("chats")
# Poison: another tenant's row on an acme subject. company_id first, so the dead letter's preview shows it.
POISON = {"company_id": "globex", **{k: v for k, v in MESSAGE.items() if k != "company_id"}, "message_id": "msg-x"}
AGENT = sample_record("agents")
FIRST = [
    ("cdc.acme.messages", sequin("messages", MESSAGE, lsn=1000), "messages insert msg-1"),
    ("cdc.acme.chats", sequin("chats", CHAT, lsn=1000, idx=1), "chats insert chat-1 (same transaction)"),
    ("cdc.acme.agents", sequin("agents", AGENT, action="read", lsn=None), "agents backfill row agent-1"),
]
THEN = [
    ("cdc.acme.messages", FIRST[0][1], "messages insert msg-1 AGAIN (a redelivery: expect no new event)"),
    (
        "cdc.acme.messages",
        sequin("messages", POISON, lsn=1001),
        "POISON: company globex on an acme subject (expect the dead-letter stream)",
    ),
    (
        "cdc.acme.messages",
        sequin("messages", {**MESSAGE, "message_id": "msg-2", "body": {"text": "thanks!"}}, lsn=1002),
        "messages insert msg-2",
    ),
]
LAST_EVENT = "1002:chatdb:acme:messages:msg-2"


# ---------------------------------------------------------------------------------------------------------------
# Processes


class Children(ProcessSet):
    """What this demo started (each in its own session: a Ctrl-C at the terminal reaches only the demo, which stops
    them in order), stopped in reverse order by pid."""

    def add(self, process: P) -> P:
        started = super().add(process)
        say(f"demo: started {started.name} (pid {started.pid})")
        return started

    def stop_demo(self) -> None:
        for process, status in self.stop_all(timeout=15):
            say(f"demo: stopped {process.name} (pid {process.pid}, exit {status})")


def within(timeout: float) -> float:
    """``timeout``, cut to what is left of the demo's budget."""
    return min(timeout, remaining())


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def metric_lines(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    wanted = ("cdc_consumer_events_total{", "cdc_consumer_dead_letters_total{")
    return [line for line in text.splitlines() if line.startswith(wanted) and not line.endswith(" 0.0")]


# ---------------------------------------------------------------------------------------------------------------
# The demo


def event_line(subject: str, data: bytes) -> str:
    event = json.loads(data)
    fields = [f"event_id={event.get('event_id')}", f"action={event.get('action')}"]
    fields += [f"{k}={event[k]}" for k in ("agent_id", "chat_id", "message_id") if k in event]
    row = event.get("row_data") or {}
    for key in ("body", "push_name", "agent_name"):
        if key in row:
            fields.append(f"{key}={json.dumps(row[key], separators=(',', ':'))}")
    return f"  EVENT {subject}  " + " ".join(fields)


async def run_demo(nats_url: str, http_port: int, service_env: dict[str, str]) -> int:
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=1)
    js = nc.jetstream()
    seen: list[str] = []

    async def on_event(msg: Any) -> None:
        say(event_line(msg.subject, msg.data))
        seen.append(json.loads(msg.data)["event_id"])

    try:
        # An ordered consumer on the output stream: only what JetStream stored, so a deduplicated repeat never shows.
        sub = await js.subscribe("wa.>", stream=OUTPUT, cb=on_event, ordered_consumer=True)
        say(f"demo: following wa.> in {OUTPUT}; publishing Sequin change events to {INPUT}")
        say()
        for subject, data, label in FIRST:
            await js.publish(subject, data)
            say(f"  SENT  {subject}  {label}")

        async def first_three() -> bool:
            return len(seen) >= 3

        await wait_for_async(first_three, within(10), what="the three first events")
        for subject, data, label in THEN:
            await js.publish(subject, data)
            say(f"  SENT  {subject}  {label}")

        async def settled() -> bool:
            if LAST_EVENT not in seen:
                return False
            info = await js.consumer_info(INPUT, DURABLE)
            dlq = await js.stream_info(DLQ)
            return bool(info.num_pending == 0 and info.num_ack_pending == 0 and dlq.state.messages >= 1)

        await wait_for_async(settled, within(10), what="the last event and the dead letter")
        await sub.unsubscribe()
        stored = (await js.stream_info(OUTPUT)).state.messages
        dead = (await js.stream_info(DLQ)).state.messages
    finally:
        await nc.close()

    say()
    say(f"demo: {len(FIRST) + len(THEN)} change events sent; {OUTPUT} stored {stored} events, {DLQ} holds {dead}")
    say(f"demo: msg-1 was sent twice and stored once: event_ids seen {seen}")
    say("demo: the service's counters (/metrics):")
    for line in await asyncio.to_thread(metric_lines, http_port):
        say(f"  {line}")
    say()
    say("demo: $ python -m cdc_service dlq list")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cdc_service",
        "dlq",
        "list",
        cwd=REPO,
        env=service_env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), min(15.0, remaining() + 5))
    for line in out.decode(errors="replace").splitlines():
        say(f"  {line}")
    say()
    ok = (
        proc.returncode == 0
        and stored == len(set(seen)) == len(seen) == 4
        and dead == 1
        and {s.split(":")[3] for s in seen} == {"messages", "chats", "agents"}
    )
    return 0 if ok else 1


def main() -> int:
    def stop_on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="cdc-demo-"))
    children = Children()
    code = 1
    try:
        http_port = free_port()
        log = workdir / "nats-server.log"
        nats = children.add(NatsServer(workdir, log=log, new_session=True, start_timeout=within(10)))
        log = workdir / "redis-server.log"
        redis = children.add(RedisServer(workdir, log=log, new_session=True, start_timeout=within(10)))
        nats_url, redis_url = nats.url, redis.url
        say(f"demo: NATS at {nats_url}, Redis at {redis_url}")

        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_") and not k.endswith("_FOR_DYNACONF")}
        env.update(
            {
                # The checkout's settings.toml (the service runs in REPO), pointed at the demo's own servers, which
                # have no credentials: the ones a developer keeps in .secrets.toml are overridden with empty values.
                **{f"{ENV_PREFIX}_{key.upper().replace('.', '__')}": "" for key in SECRET_KEYS},
                "CDC_NATS__URL": nats_url,
                "CDC_REDIS__URL": redis_url,
                "CDC_HTTP__HOST": "127.0.0.1",
                "CDC_HTTP__PORT": str(http_port),
                "CDC_SHUTDOWN__GRACE_SECONDS": "5",
                "PYTHONUNBUFFERED": "1",
            }
        )
        log = workdir / "cdc_service.log"
        command = [sys.executable, "-m", "cdc_service"]
        service = children.add(Process(command, log, env, REPO, new_session=True, name="cdc_service"))

        def service_ready() -> bool:
            if not service.alive():
                raise GiveUp(f"the service exited with {service.returncode}")
            return ready(http_port)

        wait_for(service_ready, within(20), 0.05, what="service ready")
        say(f"demo: service ready (probes and metrics at http://127.0.0.1:{http_port}/readyz, /metrics)")
        code = asyncio.run(run_demo(nats_url, http_port, env))
        if code:
            say("demo: something did not show up as expected")
    except (Exception, KeyboardInterrupt) as exc:
        say(f"demo: FAILED: {type(exc).__name__}: {exc}")
        code = 1
    finally:
        if code:
            log = workdir / "cdc_service.log"
            if log.exists():
                say("demo: last lines of the service log:")
                for line in log.read_text(errors="replace").splitlines()[-20:]:
                    say(f"  {line}")
        children.stop_demo()
        if code:
            say(f"demo: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    say(f"demo: done in {time.monotonic() - STARTED:.1f}s, exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
