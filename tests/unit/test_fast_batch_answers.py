"""How the fast-batch publisher settles each event's future from the server's batch answers (no server: the answers
are the JSON nats-server sends, see cdc_service/adapters/nats_fast_batch.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from cdc_service.adapters.nats_fast_batch import FastBatchPublisher, _Batch
from cdc_service.core.outcomes import is_permanent_rejection
from cdc_service.ports import PubAck, PublishRejected


def batch_of(publisher: FastBatchPublisher, n: int) -> _Batch:
    batch = _Batch("b1")
    loop = asyncio.get_running_loop()
    batch.futures = [loop.create_future() for _ in range(n)]
    batch.committed = True
    publisher._batches[batch.id] = batch
    return batch


def states(batch: _Batch) -> list[Any]:
    out: list[Any] = []
    for f in batch.futures:
        if not f.done():
            out.append("pending")
        elif f.exception() is not None:
            exc = f.exception()
            assert isinstance(exc, PublishRejected)
            out.append(exc.code if exc.code is not None else "transient")
        else:
            assert isinstance(f.result(), PubAck)
            out.append("stored")
    return out


ERROR_10077 = {"code": 400, "err_code": 10077, "description": "maximum messages exceeded"}


async def test_flow_acks_are_cumulative_so_a_lost_one_is_covered_by_the_next() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 6)
    publisher._answer(batch, 1, {"type": "ack", "seq": 0, "msgs": 2})
    assert states(batch) == ["pending"] * 6
    publisher._answer(batch, 5, {"type": "ack", "seq": 5, "msgs": 4})  # the ack for 2 (or 4) was lost
    assert states(batch) == ["stored"] * 5 + ["pending"]
    publisher._answer(batch, 7, {"stream": "wa_stream", "seq": 99, "batch": "b1", "count": 6})
    assert states(batch) == ["stored"] * 6


async def test_a_refused_event_fails_with_its_error_and_the_rest_of_the_batch_as_not_stored() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 5)
    publisher._answer(batch, 3, {"type": "err", "seq": 3, "error": ERROR_10077})
    assert states(batch) == ["pending", "pending", 10077, "pending", "pending"]
    publisher._answer(batch, 3, {"stream": "wa_stream", "seq": 2, "batch": "b1", "count": 2})
    assert states(batch) == ["stored", "stored", 10077, "transient", "transient"]
    assert not is_permanent_rejection(batch.futures[3].exception())  # type: ignore[arg-type]


async def test_an_unknown_batch_fails_everything_not_yet_confirmed() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 5)
    publisher._answer(batch, 2, {"type": "ack", "seq": 2, "msgs": 2})
    publisher._answer(batch, 4, {"error": {"code": 400, "err_code": 10208, "description": "batch publish ID unknown"}})
    assert states(batch) == ["stored", "stored", "transient", 10208, "transient"]
    assert not is_permanent_rejection(batch.futures[3].exception())  # type: ignore[arg-type]


async def test_a_stream_that_stops_taking_batches_turns_the_publisher_to_one_by_one() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 4)
    publisher._answer(batch, 1, {"type": "ack", "seq": 1, "msgs": 1})
    publisher._answer(batch, 2, {"error": {"code": 400, "err_code": 10205, "description": "batch publish is disabled"}})
    assert publisher.disabled
    assert states(batch) == ["stored", "transient", "transient", "transient"]


async def test_a_first_event_refused_ends_the_batch() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 3)
    publisher._answer(batch, 1, {"error": ERROR_10077})
    assert states(batch) == [10077, "transient", "transient"]


async def test_a_refusal_before_the_batch_logic_waits_for_the_closing_count() -> None:
    # e.g. a message over the stream's size limit: refused on its own reply, the batch ends at the next message.
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 4)
    too_big = {"code": 400, "err_code": 10054, "description": "message size exceeds maximum allowed"}
    publisher._answer(batch, 2, {"error": too_big})
    assert states(batch) == ["pending", 10054, "pending", "pending"]
    publisher._answer(batch, 5, {"stream": "wa_stream", "seq": 1, "batch": "b1", "count": 1})
    assert states(batch) == ["stored", 10054, "transient", "transient"]


async def test_finished_batches_are_forgotten_by_sweep() -> None:
    publisher = FastBatchPublisher(None)  # type: ignore[arg-type]
    batch = batch_of(publisher, 2)
    publisher.sweep()
    assert batch.id in publisher._batches
    publisher._answer(batch, 3, {"stream": "wa_stream", "seq": 2, "batch": "b1", "count": 2})
    publisher.sweep()
    assert batch.id not in publisher._batches


async def test_only_output_stream_subjects_go_into_batches() -> None:
    prefixed = FastBatchPublisher(None, ("wa.>", "out.x.>"))  # type: ignore[arg-type]
    assert prefixed._batched("wa.acme.1.messages.c") and prefixed._batched("out.x.y")
    assert not prefixed._batched("dlq.cdc.acme.messages") and not prefixed._batched("wax.a")
    patterns = FastBatchPublisher(None, ("wa.*.*.messages.>",))  # type: ignore[arg-type]
    assert patterns._prefixes is None
    assert patterns._batched("wa.acme.1.messages.c") and not patterns._batched("wa.acme.1.chats.c")
