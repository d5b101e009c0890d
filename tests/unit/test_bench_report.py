"""The benchmark report's batch x pool sweep compares plain configurations only: a run of the same batch and pool with
a switch flipped (fast batch, no claims, routing cache, another git ref) is a different configuration and must not
fill the default's cell."""

from typing import Any

from benchmarks.report import _sweep_table


def _run(label: str, batch: int, pool: int, **flags: Any) -> dict[str, Any]:
    return {"label": label, "kind": "service", "mode": "push", "batch": batch, "pool": pool, **flags}


def _summary(label: str, batch: int, pool: int, rate: int) -> dict[str, Any]:
    row = {"label": label, "kind": "service", "mode": "push", "batch": batch, "pool": pool}
    return {**row, "median_events_per_s": rate}


def test_a_fast_batch_run_does_not_fill_the_default_cell() -> None:
    doc = {
        "drain": [
            _run("b256 p8", 256, 8, fast_batch=False, claims=True, routing_cache=False, ref=""),
            _run("b256 p8 fast-batch", 256, 8, fast_batch=True, claims=True, routing_cache=False, ref=""),
            _run("b256 p4", 256, 4, fast_batch=False, claims=True, routing_cache=False, ref=""),
        ],
        "drain_summary": [
            _summary("b256 p8", 256, 8, 18_623),
            _summary("b256 p8 fast-batch", 256, 8, 19_917),
            _summary("b256 p4", 256, 4, 19_294),
        ],
    }
    table = "\n".join(_sweep_table(doc))
    assert "| 256 | 19,294 | 18,623 |" in table, table
    assert "19,917" not in table
