"""Markdown tables and a chart from one ``benchmarks/results/<timestamp>.json``.

python -m benchmarks.report benchmarks/results/<timestamp>.json   # rewrites latest.md and latest.png beside it
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

METHOD = """\
- **Servers**: nats-server (JetStream, file storage) and redis-server from the venv, on loopback, started by the
  benchmark and sharing the machine's cores with the process under test (and the producer in the fixed-rate runs).
  Streams are deleted and recreated and Redis is flushed before every run.
- **Events**: ~600 B Sequin insert bodies (`tests/sequin.py`), tables messages/chats/agents and 8 companies in
  rotation on `cdc.<company>.<table>`, `commit_lsn` 1..N (every event id distinct).
- **Drain**: N events preloaded, then the process under test starts. Window = from the server's store time of the
  first event in `wa_stream` (the first output; the first ack follows within one batch round trip) to the consumer's
  `ack_floor.last_active` (the server's time of the last ack), once `num_pending` = `num_ack_pending` = 0 and
  `wa_stream` holds N. Rate = N / window. Start-up (imports, connect, provisioning) is outside the window.
- **Checks (every run, else the benchmark fails)**: `wa_stream` holds exactly N, nothing pending or un-acked,
  `num_redelivered` = 0, dead-letter stream empty, and for the service N `published` / 0 `duplicate` in its metrics
  and exit code 0 after SIGTERM.
- **Bare relays** (`benchmarks/relays.py`, no parsing, no Redis, same push queue consumer): *naive* = one task per
  message, `await js.publish` then `await msg.ack()`, default asyncio loop; *ceiling* = batches of 256 or 2 ms,
  `js.publish_async` for the batch, one `wait_for(gather(...), 5)`, then the acks, uvloop.
- **Fixed rate**: a producer process does core `nc.publish` in 1 ms ticks. Latency = store time in `wa_stream` minus
  store time of the source in `cdc_events_stream` (server clock, read back with ordered consumers); the first 5 %
  (by source time) are dropped as warm-up; percentiles are nearest-rank.
- **CPU per event** (the headline beside events/s) = the process's own user+system CPU time (`/proc/<pid>/stat`
  utime+stime) over the window, divided by the events: drains count the N drained, fixed rate the events sent in the
  producer's window. For the service and for each relay, each its own process; nats-server's is shown beside it.
- **Spread**: the default configuration and both relays run at least three times; tables show the median and
  min-max, and the ratio to a relay is also given run by run (run k of the service against run k of the relay).
- **CPU** = CPU-time delta of the process over the window / wall time (psutil, 1.0 = one core; interpolated between
  0.2 s samples). For drains the window is the drain window, for fixed rate the producer's sending window.
  **Peak RSS** = largest 0.2 s sample (drain: whole process life; fixed rate: sending window); **RSS HWM** = the
  kernel's high-water mark (`VmHWM`) over the process's life, which short peaks between samples cannot escape.
  **Other CPU** = the host's busy CPU time over the window minus that of every process of the benchmark (servers,
  process under test, producer, harness): cores taken by other people's work. Runs with a high value are suspect.
"""


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}"
    return str(value)


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


GOALS = {
    "ceiling_ratio": 1.0,
    "cpu_us_per_event": 40.0,
    "p95_ms": 10.0,
    "p99_ms": 25.0,
    "cpu_cores": 0.5,
    "rss_mb": 150.0,
}


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def _spread(values: list[float], digits: int = 0) -> str:
    """``median (min-max)`` of a few runs."""
    if not values:
        return "–"
    ordered = sorted(values)
    middle = (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    )
    if len(ordered) == 1:
        return _fmt(float(middle), digits)
    return f"{_fmt(float(middle), digits)} ({_fmt(float(ordered[0]), digits)}-{_fmt(float(ordered[-1]), digits)})"


_FLAGS = {"claims": True, "routing_cache": False, "fast_batch": False, "ref": ""}  # RunConfig's defaults


def is_default(record: dict[str, Any], default: dict[str, Any]) -> bool:
    """Whether a run record is of the default configuration (every RunConfig field as the plan's default)."""
    return all(record.get(key, _FLAGS.get(key)) == value for key, value in {**_FLAGS, **default}.items())


def _default_fixed(doc: dict[str, Any], rate: float) -> dict[str, Any] | None:
    default = doc["plan"]["default"]
    for r in doc.get("fixed", []):
        if is_default(r, default) and float(r.get("rate_target", 0)) == float(rate):
            return r
    return None


def goal_rows(doc: dict[str, Any]) -> list[list[str]]:
    """The goal rows of issue 12, each computed from this run: target, result, verdict."""
    rows: list[list[str]] = []
    ratios = doc.get("ratios", {})
    service = next((s for s in doc.get("drain_summary", []) if s.get("default")), None)
    if "service_to_ceiling" in ratios:
        runs = ratios.get("service_to_ceiling_runs", [])
        rows.append(
            [
                "drain >= 1.0 x the ceiling relay (same run)",
                f"{ratios['service_to_ceiling']:.2f} (medians); run by run {', '.join(f'{x:.2f}' for x in runs)}",
                _verdict(ratios["service_to_ceiling"] >= GOALS["ceiling_ratio"]),
            ]
        )
    if service is not None and service.get("cpu_us_per_event") is not None:
        rows.append(
            [
                "service CPU per drained event <= 40 us",
                f"{_spread(service.get('cpu_us_per_event_runs', []), 1)} us"
                f" (nats-server {_fmt(service.get('nats_cpu_us_per_event'), 1)} us)",
                _verdict(service["cpu_us_per_event"] <= GOALS["cpu_us_per_event"]),
            ]
        )
    plan = doc["plan"]
    rates = plan.get("rates") or [plan["rate"]]
    five = _default_fixed(doc, rates[0])
    if five is not None:
        lat = five["latency_ms"]
        rss = five.get("peak_rss_mb")
        label = f"{rates[0]:,.0f}/s"
        rows += [
            [f"{label}: p95 <= 10 ms", f"{lat['p95']:.2f} ms", _verdict(lat["p95"] <= GOALS["p95_ms"])],
            [f"{label}: p99 <= 25 ms", f"{lat['p99']:.2f} ms", _verdict(lat["p99"] <= GOALS["p99_ms"])],
            [
                f"{label}: service CPU <= 0.5 core",
                f"{_fmt(five['cpu_cores'], 2)} core ({_fmt(five.get('cpu_us_per_event'), 1)} us/event)",
                _verdict(None if five["cpu_cores"] is None else five["cpu_cores"] <= GOALS["cpu_cores"]),
            ],
            [
                f"{label}: RSS <= 150 MiB",
                f"{_fmt(rss, 1)} MB peak (HWM {_fmt(five.get('rss_high_water_mb'), 1)} MB)",
                _verdict(None if rss is None else rss <= GOALS["rss_mb"]),
            ],
        ]
    for rate in rates[1:]:
        other = _default_fixed(doc, rate)
        if other is not None:
            lat = other["latency_ms"]
            rows.append(
                [
                    f"{rate:,.0f}/s offered (measured, no target)",
                    f"in {_fmt(other['stored_in_rate'])}/s, out {_fmt(other['stored_out_rate'])}/s; p50/p95/p99 "
                    f"{lat['p50']:.2f}/{lat['p95']:.2f}/{lat['p99']:.2f} ms; CPU {_fmt(other['cpu_cores'], 2)} core "
                    f"({_fmt(other.get('cpu_us_per_event'), 1)} us/event); RSS {_fmt(other.get('peak_rss_mb'), 1)} MB",
                    "–",
                ]
            )
    return rows


def write_markdown(doc: dict[str, Any], path: Path, json_name: str) -> None:
    machine = doc["machine"]
    plan = doc["plan"]
    packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
    lines = [
        f"# cdc_service end-to-end benchmark — {plan['name']}",
        "",
        f"Run {doc['started']} → {doc.get('finished', '?')} ({doc.get('duration_s', '?')} s); raw numbers in "
        f"`{json_name}`. Regenerate this page with `python -m benchmarks.report benchmarks/results/{json_name}`.",
        "",
        "**The host is shared and noisy**: read every number as a range (the perf probe saw 10-25 % between runs on "
        "throughput and up to 3x on p95/p99).",
        "",
        "## Machine",
        "",
        *_table(
            ["fact", "value"],
            [
                ["nproc", _fmt(machine["nproc"])],
                ["CPU", machine["cpu_model"]],
                ["memory", f"{machine['memory_gb']} GiB"],
                ["Python", f"{machine['python_implementation']} {machine['python']}"],
                ["nats-server", machine["nats_server"]],
                ["redis-server", machine["redis_server"]],
                ["packages", packages],
                ["git (repository)", machine["git_commit"]],
                [
                    "code under test",
                    f"{doc.get('code', {}).get('source', 'work tree')} ({doc.get('code', {}).get('commit', '?')})",
                ],
                ["load average before / after", f"{doc['load_average_before']} / {doc.get('load_average_after')}"],
            ],
        ),
        "",
        "## Plan",
        "",
        f"N = {plan['events']:,} events per drain, {plan['passes']} pass(es) over {len(plan['drains'])} drain "
        f"configurations, then {plan.get('core_repeats', 0)} more run(s) of the service default and both relays "
        "(one unreported warm-up drain first); "
        f"fixed rate {', '.join(f'{r:,.0f}' for r in (plan.get('rates') or [plan['rate']]))} events/s for "
        f"{plan['seconds']:.0f} s per run. "
        f"Service defaults: batch {plan['default']['batch']}, pool {plan['default']['pool']} (bNNN pNN below); the "
        "default configuration is marked (default).",
        "",
    ]
    goals = goal_rows(doc)
    if goals:
        lines += ["## Goals (issue 12)", "", *_table(["goal", "this run", "verdict"], goals), ""]
    if doc.get("drain_summary"):
        ratios = doc.get("ratios", {})
        lines += ["## Backlog drain", ""]
        rows = []
        for s in doc["drain_summary"]:
            spread = (
                f"{_fmt(s.get('min_events_per_s'))}-{_fmt(s.get('max_events_per_s'))}" if len(s["runs"]) > 1 else ""
            )
            rows.append(
                [
                    s["label"] + (" **(default)**" if s.get("default") else ""),
                    f"**{_fmt(s['median_events_per_s'])}**",
                    spread,
                    str(len(s["runs"])),
                    f"**{_spread(s.get('cpu_us_per_event_runs', []), 1)}**",
                    _fmt(s.get("nats_cpu_us_per_event"), 1),
                    _fmt(s["seconds"], 2),
                    _fmt(s["cpu_cores"], 2),
                    _fmt(s["peak_rss_mb"], 1),
                    _fmt(s.get("rss_high_water_mb"), 1),
                    _fmt(s["nats_cpu_cores"], 2),
                    _fmt(s["redis_cpu_cores"], 2),
                    _fmt(s.get("other_cpu_cores"), 2),
                ]
            )
        lines += _table(
            [
                "configuration",
                "events/s (median)",
                "min-max",
                "runs",
                "CPU us/event (median, min-max)",
                "nats-server us/event",
                "window s",
                "CPU cores",
                "peak RSS MB",
                "RSS HWM MB",
                "nats CPU",
                "redis CPU",
                "other CPU (max)",
            ],
            rows,
        )
        lines += ["", "### Service against the bare relays (same run, same events)", ""]
        ratio_rows = []
        for key, text in (
            ("service_to_naive", "service / naive relay"),
            ("service_to_ceiling", "service / ceiling relay"),
            ("cpu_per_event_service_to_naive", "CPU per event: service / naive relay"),
            ("cpu_per_event_service_to_ceiling", "CPU per event: service / ceiling relay"),
            ("fast_batch_to_default", "publish.fast_batch on / off (drain)"),
            ("cpu_per_event_fast_batch_to_default", "CPU per event: publish.fast_batch on / off"),
            ("pull_to_push", "service pull / service push"),
            ("partitioned_to_pull", "partitioned ordering / replica ordering (both pull)"),
            ("partitioned_to_push", "partitioned ordering / service push"),
        ):
            if key in ratios:
                ratio_rows.append([text, f"{ratios[key]:.2f}"])
        lines += _table([f"ratio ({ratios.get('service', 'service')})", "value"], ratio_rows)
        lines += _sweep_table(doc)
    if doc.get("fixed"):
        lines += ["", "## Fixed rate", ""]
        rows = []
        default = doc["plan"]["default"]
        for r in doc["fixed"]:
            lat = r["latency_ms"]
            rows.append(
                [
                    r["label"] + (" **(default)**" if is_default(r, default) else ""),
                    _fmt(r.get("rate_target", plan["rate"])),
                    _fmt(r["producer_rate"]),
                    _fmt(r["stored_in_rate"]),
                    _fmt(r["stored_out_rate"]),
                    _fmt(lat["p50"], 2),
                    f"**{_fmt(lat['p95'], 2)}**",
                    _fmt(lat["p99"], 2),
                    _fmt(lat["max"], 1),
                    _fmt(r["cpu_cores"], 2),
                    _fmt(r.get("cpu_us_per_event"), 1),
                    _fmt(r["peak_rss_mb"], 1),
                    _fmt(r.get("rss_high_water_mb"), 1),
                    _fmt(r["nats_cpu_cores"], 2),
                    _fmt(r["redis_cpu_cores"], 2),
                    _fmt(r.get("other_cpu_cores"), 2),
                ]
            )
        lines += _table(
            [
                "configuration",
                "offered/s",
                "produced/s",
                "stored in/s",
                "stored out/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "max ms",
                "CPU cores",
                "CPU us/event",
                "peak RSS MB",
                "RSS HWM MB",
                "nats CPU",
                "redis CPU",
                "other CPU",
            ],
            rows,
        )
    runs = doc.get("drain", []) + doc.get("fixed", [])
    warnings = [w for r in runs for w in r.get("log_warnings", {}).get("first", [])]
    total_warnings = sum(r.get("log_warnings", {}).get("count", 0) for r in runs)
    lines += [
        "",
        f"All checks passed in all {len(runs)} runs (a failed check aborts the benchmark, so a written report means "
        f"they held). Service log lines at WARNING or above over all runs: {total_warnings}"
        + (f" (first: {'; '.join(warnings[:3])})" if warnings else "")
        + ".",
        "",
        "## Method",
        "",
        METHOD,
        "![drain throughput and fixed-rate p95 against batch size](latest.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def _plain_labels(doc: dict[str, Any]) -> set[str]:
    """Labels of the drain configurations with every switch (claims, routing cache, fast batch, git ref) at its
    default: the only ones the batch x pool sweep and its chart compare (a fast-batch run of the same batch and pool
    is another configuration). Read from the run records, which carry every RunConfig field."""
    return {
        r["label"] for r in doc.get("drain", []) if all(r.get(key, value) == value for key, value in _FLAGS.items())
    }


def _sweep_table(doc: dict[str, Any]) -> list[str]:
    cells: dict[tuple[int, int], int] = {}
    plain = _plain_labels(doc)
    for s in doc["drain_summary"]:
        if s["kind"] == "service" and s["mode"] == "push" and s["label"] in plain:
            cells[(s["batch"], s["pool"])] = s["median_events_per_s"]
    batches = sorted({b for b, _ in cells})
    pools = sorted({p for _, p in cells})
    if len(cells) < 2:
        return []
    rows = [[str(b)] + [_fmt(cells.get((b, p))) for p in pools] for b in batches]
    title = "### Sweep: service push drain events/s by batch size (rows) and pool size (columns)"
    return ["", title, "", *_table(["batch \\ pool", *[str(p) for p in pools]], rows)]


def _batch_axis(axis: Any, batches: list[int]) -> None:
    axis.set_xscale("log", base=2)
    if batches:
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.minorticks_off()


def write_chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    summary = doc.get("drain_summary", [])
    plain = _plain_labels(doc)
    sweep = [s for s in summary if s["kind"] == "service" and s["mode"] == "push" and s["label"] in plain]
    pools = sorted({s["pool"] for s in sweep})
    for pool in pools:
        points = sorted((s["batch"], s["median_events_per_s"]) for s in sweep if s["pool"] == pool)
        if points:
            left.plot(*zip(*points, strict=True), marker="o", label=f"service push, pool {pool}")
    for s in summary:
        if s["kind"] == "service" and s["mode"] == "pull":
            left.plot(
                [s["batch"]],
                [s["median_events_per_s"]],
                marker="s",
                linestyle="",
                color="black",
                label=f"service pull, pool {s['pool']}",
            )
    styles = {"naive": ("tab:gray", ":"), "ceiling": ("tab:red", "--")}
    for s in summary:
        if s["kind"] in styles:
            color, style = styles[s["kind"]]
            left.axhline(s["median_events_per_s"], color=color, linestyle=style, label=f"{s['kind']} relay")
    _batch_axis(left, sorted({s["batch"] for s in summary if s["kind"] == "service"}))
    left.set_xlabel("batch size")
    left.set_ylabel("events/s (median)")
    left.set_title(f"Backlog drain, N={doc['plan']['events']:,}")
    left.set_ylim(bottom=0)
    left.grid(True, alpha=0.3)
    if summary:
        left.legend(fontsize=8)

    main_rate = float((doc["plan"].get("rates") or [doc["plan"]["rate"]])[0])
    fixed = [r for r in doc.get("fixed", []) if float(r.get("rate_target", main_rate)) == main_rate]
    push = sorted(
        ((r["batch"], r["latency_ms"]) for r in fixed if r["mode"] == "push" and not r.get("fast_batch")),
        key=lambda point: point[0],
    )
    if push:
        batches = [b for b, _ in push]
        for pct, style in (("p50", ":"), ("p95", "-"), ("p99", "--")):
            right.plot(batches, [lat[pct] for _, lat in push], marker="o", linestyle=style, label=f"push {pct}")
    for r in fixed:
        if r.get("fast_batch"):
            right.plot(
                [r["batch"]],
                [r["latency_ms"]["p95"]],
                marker="^",
                linestyle="",
                color="tab:green",
                label="fast batch p95",
            )
        if r["mode"] == "pull":
            right.plot(
                [r["batch"]], [r["latency_ms"]["p95"]], marker="s", linestyle="", color="black", label="pull p95"
            )
    _batch_axis(right, sorted({r["batch"] for r in fixed}))
    right.set_xlabel("batch size")
    right.set_ylabel("latency ms (wa_stream store - source store)")
    right.set_title(f"Fixed rate {doc['plan']['rate']:,.0f}/s for {doc['plan']['seconds']:.0f} s")
    right.set_ylim(bottom=0)
    right.grid(True, alpha=0.3)
    if fixed:
        right.legend(fontsize=8)
    fig.suptitle(f"cdc_service e2e ({doc['plan']['name']}, {doc['started']}, {doc['machine']['nproc']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def console_summary(doc: dict[str, Any]) -> str:
    lines = [""]
    for s in doc.get("drain_summary", []):
        lines.append(
            f"drain  {s['label']:<28} {s['median_events_per_s']:>8,} ev/s ({_fmt(s.get('min_events_per_s'))}-"
            f"{_fmt(s.get('max_events_per_s'))})  {_fmt(s.get('cpu_us_per_event'), 1)} us/ev  "
            f"cpu {_fmt(s['cpu_cores'], 2)}  rss {_fmt(s['peak_rss_mb'], 1)} MB"
            + (f"  / ceiling by run {s['to_ceiling_runs']}" if s.get("to_ceiling_runs") else "")
        )
    ratios = doc.get("ratios", {})
    if ratios:
        lines.append("ratios " + ", ".join(f"{k} {v}" for k, v in ratios.items() if k != "service"))
    for goal, result, verdict in goal_rows(doc):
        lines.append(f"goal   {goal}: {result} [{verdict}]")
    for r in doc.get("fixed", []):
        lat = r["latency_ms"]
        lines.append(
            f"fixed  {r['label']:<28} @{r.get('rate_target', 0):>6,.0f}/s in {r['stored_in_rate']:>7,.0f}/s  "
            f"p50/p95/p99 {lat['p50']}/{lat['p95']}/{lat['p99']} ms  cpu {_fmt(r['cpu_cores'], 2)} "
            f"({_fmt(r.get('cpu_us_per_event'), 1)} us/ev)  rss {_fmt(r['peak_rss_mb'], 1)} MB"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", type=Path)
    args = parser.parse_args(argv)
    doc = json.loads(args.result.read_text())
    write_markdown(doc, args.result.parent / "latest.md", args.result.name)
    write_chart(doc, args.result.parent / "latest.png")
    print(console_summary(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
