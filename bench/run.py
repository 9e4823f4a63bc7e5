"""``make bench``: the worker's throughput beside a ceiling and a naive loop.

One run starts its own broker (port 19292, data wiped), writes a backlog of
records, and measures on that same data:

- A, the ceiling: a plain consumer that only consumes and Avro-decodes;
- B, ``python -m worker run --until-caught-up`` with its normal settings
  (dedupe and transactions on) against the Track API simulator;
- C, a loop with the official ``customerio`` client, one call per record, on
  a sample, extrapolated;
- R, B again with the simulator limited to ``--rate-limit-rps``;
- L, latency from produce to acceptance at a steady offered load;
- P, B again under py-spy, for the hot spots.

It writes ``bench/results/latest.json``, ``latest.md``, ``throughput.png`` and
the profile, and prints the Markdown table. Quick run::

    .venv/bin/python -m bench.run --records 50000 --only A,B,C
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import data, report
from bench.latency import run_latency
from bench.phases import (
    Context,
    profile_worker,
    run_ceiling,
    run_naive,
    run_worker,
)
from bench.procstat import machine
from bench.profile import summarise
from bench.services import (
    BENCH_BROKER_PORT,
    Server,
    broker_pid,
    reset_simulator,
    running_broker,
    start_simulator,
    start_v1_stub,
)
from worker.settings import load_settings

PHASES = ("A", "B", "C", "R", "L", "P")
PROFILE_RATE_HZ = 100
# Fewer records than this is a quick run: shorter time-bound phases.
QUICK_BELOW_RECORDS = 500_000
RESULTS = Path("bench/results")
WORK_DIR = Path(".cache/bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument(
        "--only", default=",".join(PHASES), help="phases to run, e.g. A,B,C"
    )
    parser.add_argument(
        "--naive-records", type=int, help="C's sample (default: 5,000; quick: 2,000)"
    )
    parser.add_argument("--rate-limit-rps", type=float, default=100.0)
    parser.add_argument(
        "--binding-rps",
        default="auto",
        help="a second, lower limit for R that binds: a number, auto (half of B's "
        "rate in full requests) or 0 for none",
    )
    parser.add_argument(
        "--window-s",
        type=float,
        help="R and P stop the worker after this long if it has not caught up "
        "(default: 60 s; quick: 15 s)",
    )
    parser.add_argument("--latency-rate", type=float, default=2_000.0)
    parser.add_argument(
        "--latency-warmup-seconds",
        type=float,
        default=5.0,
        help="L's load before the measured time, left out of its percentiles "
        "(reported beside them)",
    )
    parser.add_argument(
        "--latency-seconds", type=float, help="L's load time (default: 30; quick: 10)"
    )
    parser.add_argument(
        "--latency-linger-ms",
        help="linger_ms values for L, the first being the worker's default "
        "(default: 200,20; quick: 200)",
    )
    parser.add_argument("--broker-port", type=int, default=BENCH_BROKER_PORT)
    parser.add_argument(
        "--worker-kafka-properties",
        help="extra librdkafka properties for every worker run, as JSON (the "
        "worker's CIO_KAFKA__PROPERTIES), e.g. '{\"max.partition.fetch.bytes\": "
        "\"262144\"}'; default: the worker's own settings",
    )
    parser.add_argument("--keep-broker-data", action="store_true")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.phases = [p.strip().upper() for p in args.only.split(",") if p.strip()]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    _fill_defaults(args)
    args.lingers = [int(v) for v in args.latency_linger_ms.split(",") if v.strip()]
    return args


def _fill_defaults(args: argparse.Namespace) -> None:
    """Full-length phases for a full backlog; shorter ones for a quick run."""
    quick = args.records < QUICK_BELOW_RECORDS
    defaults = {
        "naive_records": 2_000 if quick else 5_000,
        "window_s": 15.0 if quick else 60.0,
        "latency_seconds": 10.0 if quick else 30.0,
        "latency_linger_ms": "200" if quick else "200,20",
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the broker and the servers are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    if args.worker_kafka_properties:
        # Every worker phase copies this process's environment (worker_env).
        json.loads(args.worker_kafka_properties)  # fail early on bad JSON
        os.environ["CIO_KAFKA__PROPERTIES"] = args.worker_kafka_properties
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    sizes = data.entry_sizes()
    summary: dict[str, Any] = {
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "command": "python -m bench.run " + shlex.join(argv or sys.argv[1:]),
        "records": args.records,
        "worker_kafka_properties": args.worker_kafka_properties or None,
        "machine": machine(),
        "data": _data_description(sizes),
        "phases": {},
    }
    _log(f"phases {','.join(args.phases)} on {args.records:,} records")
    with running_broker(args.broker_port, args.keep_broker_data) as broker:
        ctx = Context(
            broker.bootstrap_servers,
            data.Topics.fresh("backlog"),
            args.records,
            WORK_DIR,
            broker_pid(broker),
        )
        _run_phases(ctx, args, summary)
    _summarise(summary, sizes, args)
    summary["seconds"] = round(time.monotonic() - started, 1)
    report.write_json(summary, args.results / "latest.json")
    table = report.markdown(summary)
    (args.results / "latest.md").write_text(table)
    problem = report.chart(summary, args.results / "throughput.png")
    print(table)
    if problem:
        print(problem, file=sys.stderr)
    _log(f"done in {summary['seconds']:.0f} s; see {args.results}/latest.json")
    return 0 if _all_ran(summary) else 1


def _run_phases(
    ctx: Context, args: argparse.Namespace, summary: dict[str, Any]
) -> None:
    phases, results = args.phases, summary["phases"]
    if set(phases) & {"A", "B", "C", "R", "P"}:
        ctx.topics.create(ctx.bootstrap)
        _log(f"writing {ctx.records:,} records")
        seconds = data.preload(ctx.bootstrap, ctx.topics, ctx.records)
        summary["data"]["produce_seconds"] = round(seconds, 1)
    if "A" in phases:
        _log("A: consume and decode only")
        results["A"] = run_ceiling(ctx)
    with _simulator(None, {"B", "L", "P"} & set(phases)) as simulator:
        if "B" in phases:
            _log("B: cio-worker run --until-caught-up")
            results["B"] = run_worker(ctx, simulator, "worker")
            reset_simulator(simulator)
        if "C" in phases:
            sample = min(args.naive_records, ctx.records)
            _log(f"C: official client, one call per record, {sample:,} records")
            with _stub() as stub:
                results["C"] = run_naive(ctx, stub, sample)
        if "L" in phases:
            results["L"] = []
            for linger in args.lingers:
                _log(f"L: {args.latency_rate:,.0f} records/s, linger_ms {linger}")
                results["L"].append(
                    run_latency(
                        ctx, simulator, rate_per_s=args.latency_rate,
                        duration_s=args.latency_seconds, linger_ms=linger,
                        warmup_s=args.latency_warmup_seconds,
                    )
                )  # fmt: skip
            reset_simulator(simulator)
        if "P" in phases:
            _log("P: cio-worker under py-spy")
            results["P"] = _profile(ctx, simulator, args)
    if "R" in phases:
        results["R"] = _limited(ctx, args.rate_limit_rps, args.window_s)
        binding = _binding_rps(args.binding_rps, results.get("B"))
        if binding:
            results["R_binding"] = _limited(ctx, binding, args.window_s)


def _limited(ctx: Context, rps: float, window_s: float) -> dict[str, Any]:
    _log(f"R: cio-worker, simulator limited to {rps:g} requests/s")
    with _simulator(rps, {"R"}) as limited:
        result = run_worker(
            ctx, limited, f"limited{rps:g}", window_s=window_s, fetch_state=False
        )
    result["rate_limit_rps"] = rps
    return result


def _binding_rps(choice: str, worker: dict[str, Any] | None) -> float:
    """The lower limit: given, or half of B's rate in full requests."""
    if choice != "auto":
        return float(choice)
    if not worker:
        return 0.0
    per_request = load_settings().batch.max_entries
    return float(max(1, round(worker["records_per_s"] / 2 / per_request)))


def _profile(
    ctx: Context, simulator: Server, args: argparse.Namespace
) -> dict[str, Any]:
    result = profile_worker(
        ctx, simulator, args.results, PROFILE_RATE_HZ, args.window_s
    )
    titles = {
        "worker": "cio-worker run --until-caught-up (the B run, profiled)",
        "simulator": "worker.sandbox.simulator during that run",
    }
    result["hot_spots"] = {
        name: summarise(Path(path), PROFILE_RATE_HZ, titles[name])
        for name, path in result.get("profiles", {}).items()
    }
    reset_simulator(simulator)
    return result


@contextlib.contextmanager
def _simulator(rps: float | None, needed: set[str]) -> Iterator[Any]:
    if not needed:
        yield None
        return
    simulator = start_simulator(rps)
    try:
        yield simulator
    finally:
        simulator.stop()


@contextlib.contextmanager
def _stub() -> Iterator[Server]:
    stub = start_v1_stub()
    try:
        yield stub
    finally:
        stub.stop()


def _data_description(sizes: data.EntrySizes) -> dict[str, Any]:
    return {
        "description": (
            f"{data.PERSON_SHARE:.0%} people with 20 attributes, "
            f"{1 - data.PERSON_SHARE:.0%} events, Avro, lz4, "
            f"{data.PARTITIONS} partitions per topic"
        ),
        "person_share": data.PERSON_SHARE,
        "partitions_per_topic": data.PARTITIONS,
        "mean_person_entry_bytes": round(sizes.person_bytes, 1),
        "mean_event_entry_bytes": round(sizes.event_bytes, 1),
        "mean_entry_bytes": round(sizes.mean_bytes, 1),
    }


def _summarise(
    summary: dict[str, Any], sizes: data.EntrySizes, args: argparse.Namespace
) -> None:
    phases = summary["phases"]
    a, b, c = phases.get("A"), phases.get("B"), phases.get("C")
    summary["ceiling_records_per_s"] = a["records_per_s"] if a else None
    summary["worker_records_per_s"] = b["records_per_s"] if b else None
    summary["naive_records_per_s"] = c["records_per_s"] if c else None
    if b:
        summary["worker_records_per_s_steady"] = b["records_per_s_steady"]
        summary["worker_records_per_s_delivering"] = b["records_per_s_delivering"]
        summary["worker_cpu_s_per_million"] = b["cpu_s_per_million"]
        summary["peak_rss_mb"] = b["peak_rss_mb"]
        summary["mean_entries_per_request"] = b["simulator"]["mean_entries_per_request"]
        summary["mean_bytes_per_request"] = b["simulator"]["mean_bytes_per_request"]
    summary["rate_limit"] = _rate_limit(phases.get("R"), sizes)
    summary["rate_limit_binding"] = _rate_limit(phases.get("R_binding"), sizes)
    limit, binding = summary["rate_limit"], summary["rate_limit_binding"]
    summary["rate_limited_efficiency"] = limit["efficiency"] if limit else None
    summary["rate_limited_efficiency_binding"] = (
        binding["efficiency"] if binding else None
    )
    first = (phases.get("L") or [{}])[0]
    summary["p50_latency_ms"] = first.get("p50_ms")
    summary["p99_latency_ms"] = first.get("p99_ms")
    summary["p99_latency_ms_with_warmup"] = first.get("p99_ms_with_warmup")
    summary["targets"] = report.targets(summary)


def _rate_limit(
    run: dict[str, Any] | None, sizes: data.EntrySizes
) -> dict[str, Any] | None:
    """R's records/s over what the limit allows for entries of this data's size:
    the limit times the entries one request carries (the fewer of what fits in
    max_request_bytes at the data's mean entry size, and max_entries)."""
    if not run:
        return None
    batch = load_settings().batch  # config/worker.toml, as the worker reads it
    rps = run["rate_limit_rps"]
    by_bytes = sizes.entries_per_request(batch.max_request_bytes)
    per_request = min(by_bytes, batch.max_entries)
    ceiling = rps * per_request
    achieved = run["records_per_s_delivering"]
    totals = run["log_totals"]
    return {
        "rps": rps,
        "mean_entry_bytes": round(sizes.mean_bytes, 1),
        "entries_by_bytes": by_bytes,
        "max_entries": batch.max_entries,
        "entries_per_request": per_request,
        "ceiling_records_per_s": ceiling,
        "records_per_s": achieved,
        "efficiency": round(achieved / ceiling, 3),
        "window_s": run["wall_s"],
        "caught_up": run["caught_up"],
        "requests_per_s": round(totals["requests"] / max(run["wall_s"], 1e-9), 1),
        "mean_entries_per_request": totals["mean_entries_per_request"],
        "throttled": totals["retries_after_429"],
    }


def _all_ran(summary: dict[str, Any]) -> bool:
    """True when every phase that ran finished with exit code 0."""
    runs: list[dict[str, Any]] = []
    for value in summary["phases"].values():
        runs += value if isinstance(value, list) else [value]
    return all(run.get("exit_code", 0) == 0 for run in runs)


def _log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
