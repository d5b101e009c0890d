"""``make demo`` (tools/demo.py): it starts its own servers and the service, shows events for all three tables, the
deduplicated repeat and the dead letter, stops everything it started and exits 0 on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

from tests.servers import REPO


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_runs_by_itself_and_stops_what_it_started() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "tools/demo.py"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    elapsed = time.monotonic() - started
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert elapsed < 30, elapsed

    events = [line.strip() for line in out.splitlines() if line.strip().startswith("EVENT ")]
    subjects = [line.split()[1] for line in events]
    assert subjects.count("wa.acme.agent-1.messages.chat-1") == 2, events  # msg-1 and msg-2; the repeat is not shown
    assert subjects.count("wa.acme.agent-1.chats") == 1, events
    assert subjects.count("wa.acme.agent-1.agents") == 1, events
    assert sum("event_id=1000:chatdb:acme:messages:msg-1 " in line for line in events) == 1, events
    assert "wa_stream stored 4 events, cdc_dlq_stream holds 1" in out
    assert 'cdc_consumer_events_total{result="duplicate",table="messages"} 1.0' in out
    assert 'cdc_consumer_dead_letters_total{reason="tenant_mismatch"} 1.0' in out

    # The `dlq list` table, with the poison message.
    rows = [line.split(maxsplit=4) for line in out.splitlines() if re.match(r"\s+\d+\s+\d+s\s+\w+", line)]
    assert [(r[2], r[3]) for r in rows] == [("tenant_mismatch", "cdc.acme.messages")], out
    detail_and_preview = rows[0][4]  # the DETAIL column, then the PREVIEW
    assert detail_and_preview.startswith("record.company_id differs from the subject")
    assert '  {"record": {"company_id": "globex"' in detail_and_preview

    # Its own ports, never the usual ones, and every process it started is stopped (and reaped) by pid.
    nats_url = re.search(r"NATS at nats://127\.0\.0\.1:(\d+)", out)
    redis_url = re.search(r"Redis at redis://127\.0\.0\.1:(\d+)", out)
    assert nats_url and int(nats_url.group(1)) != 4222
    assert redis_url and int(redis_url.group(1)) != 6379
    started_pids = {int(p) for p in re.findall(r"demo: started \S+ \(pid (\d+)\)", out)}
    stopped_pids = {int(p) for p in re.findall(r"demo: stopped \S+ \(pid (\d+), exit 0\)", out)}
    assert len(started_pids) == 3
    assert stopped_pids == started_pids, out
    assert all(_gone(pid) for pid in started_pids)
    assert "stopped cdc_service" in out.split("stopped redis-server")[0]  # the service first
