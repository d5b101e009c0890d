"""The dead-letter workflow end to end: ``dlq show``, ``dlq replay --seq``, ``dlq purge``, exit codes, and output cut
short by its reader. Poison is dead-lettered by the real service; the tools run as subprocesses."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from tests.integration.helpers import DLQ, INPUT, OUTPUT, count, ensure_input, read_all, wait_count
from tests.integration.test_dlq_tools import (
    INVALID_JSON,
    SMALL_LIMIT,
    SUBJECT,
    TENANT_MISMATCH,
    _big,
    cli,
    dead_letter,
    reasons_in_dlq,
)
from tests.servers import REPO, free_port, service_env


async def test_show_prints_headers_and_the_body(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    start_service()
    await dead_letter(js, SUBJECT, INVALID_JSON)
    await dead_letter(js, SUBJECT, TENANT_MISMATCH)

    code, out, err = await cli(nats_server, redis_server, "show", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "seq:      1"
    assert lines[1] == f"subject:  dlq.{SUBJECT}"
    assert "  Cdc-Error-Reason: invalid_json" in lines
    assert f"  Cdc-Source-Subject: {SUBJECT}" in lines
    assert f"  Cdc-Source-Stream: {INPUT}" in lines
    assert lines[-3:] == [
        f"body ({len(INVALID_JSON)} bytes, not JSON; escaped):",
        '{"record": {"message_id": "m1",',
        "\\t",
    ]

    code, out, err = await cli(nats_server, redis_server, "show", "2")
    assert code == 0, err
    body_at = out.splitlines().index(f"body ({len(TENANT_MISMATCH)} bytes, JSON, indented):")
    assert json.loads("\n".join(out.splitlines()[body_at + 1 :])) == json.loads(TENANT_MISMATCH)

    code, out, err = await cli(nats_server, redis_server, "show", "1", "--raw")
    assert (code, out.encode()) == (0, INVALID_JSON)

    code, out, err = await cli(nats_server, redis_server, "show", "99")
    assert (code, out) == (3, "")
    assert err.strip() == f"no dead letter with sequence 99 in {DLQ}"
    assert await count(js, DLQ) == 2  # reading consumed nothing


async def test_replay_by_sequence(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    small = start_service(**SMALL_LIMIT)
    for lsn in (2001, 2002, 2003):
        await dead_letter(js, SUBJECT, _big("messages", lsn))
    assert small.stop() == 0
    start_service()

    code, out, err = await cli(nats_server, redis_server, "replay", "--seq", "3,1", "--dry-run")
    assert code == 0, err
    assert [line.split()[:2] for line in out.splitlines()[:-1]] == [["would", "replay"]] * 2
    assert "seq=3 " in out.splitlines()[0] and "seq=1 " in out.splitlines()[1]  # in the order given
    assert await count(js, DLQ) == 3

    code, out, err = await cli(nats_server, redis_server, "replay", "--seq", "3,1")
    assert code == 0, err
    assert out.splitlines()[-1] == "replayed=2 failed=0 skipped=0"
    assert [m.seq for m in await read_all(js, DLQ)] == [2]
    assert await wait_count(js, OUTPUT, 2) == 2

    # A sequence that is not there: the others are still replayed, and the status says one was missing.
    code, out, err = await cli(nats_server, redis_server, "replay", "--seq", "2,77")
    assert code == 3, (out, err)
    assert out.splitlines()[-1] == "replayed=1 failed=0 skipped=0"
    assert err.strip() == f"no dead letter with sequence 77 in {DLQ}"
    assert await count(js, DLQ) == 0
    assert await wait_count(js, OUTPUT, 3) == 3


async def test_purge_by_sequence_reason_and_age(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    start_service(**SMALL_LIMIT)
    await dead_letter(js, SUBJECT, INVALID_JSON)
    await dead_letter(js, SUBJECT, TENANT_MISMATCH)
    await dead_letter(js, SUBJECT, _big("messages", 2001))
    await dead_letter(js, SUBJECT, INVALID_JSON.replace(b"m1", b"m2"))

    code, _, err = await cli(nats_server, redis_server, "purge")
    assert code == 2
    assert "--seq, --reason or --older-than" in err

    code, out, err = await cli(nats_server, redis_server, "purge", "--reason", "invalid_json", "--dry-run")
    assert code == 0, err
    assert [line.split()[2] for line in out.splitlines()[:-1]] == ["seq=1", "seq=4"]
    assert out.splitlines()[-1] == "dry run: would_purge=2; nothing removed"
    assert await count(js, DLQ) == 4

    code, out, err = await cli(nats_server, redis_server, "purge", "--older-than", "1h")
    assert (code, out.splitlines()) == (0, ["purged=0 failed=0"]), err
    assert await count(js, DLQ) == 4

    code, out, err = await cli(nats_server, redis_server, "purge", "--seq", "2")
    assert code == 0, err
    assert out.splitlines()[-1] == "purged=1 failed=0"
    assert await reasons_in_dlq(js) == ["invalid_json", "payload_too_large", "invalid_json"]

    code, out, err = await cli(nats_server, redis_server, "purge", "--reason", "invalid_json", "--older-than", "0s")
    assert code == 0, err
    assert out.splitlines()[-1] == "purged=2 failed=0"
    assert await reasons_in_dlq(js) == ["payload_too_large"]

    code, out, err = await cli(nats_server, redis_server, "purge", "--seq", "1")
    assert code == 3
    assert err.strip() == f"no dead letter with sequence 1 in {DLQ}"

    code, _, err = await cli(nats_server, redis_server, "purge", "--older-than", "soon")
    assert code == 2
    assert "duration" in err


async def test_list_cut_short_by_its_reader_ends_quietly(js, start_service, nats_server, redis_server) -> None:
    await ensure_input(js)
    start_service()
    for i in range(3):
        await dead_letter(js, SUBJECT, INVALID_JSON.replace(b"m1", f"m{i}".encode()))
    env = service_env(nats_server.url, redis_server.url, free_port())
    command = f"set -o pipefail; {sys.executable} -m cdc_service dlq list --json | head -1"

    def pipeline() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, timeout=60, check=False)

    result = await asyncio.to_thread(pipeline)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert json.loads(result.stdout)["seq"] == 1

    # The reader gone before the first line: the same.
    def closed_reader() -> tuple[int, bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc_service", "dlq", "list"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        err = proc.stderr.read()
        return proc.wait(timeout=60), err

    code, err = await asyncio.to_thread(closed_reader)
    assert (code, err) == (0, b"")
