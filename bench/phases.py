"""The measured phases: A (ceiling), B (worker), C (naive loop), R (B under a
rate limit) and P (B under the profiler). L, the latency phase, is in
``bench.latency``. Each returns plain data for ``latest.json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data import Topics
from bench.monitor import ChildRun, GroupProgress, batch_log_totals, run_child
from bench.procstat import cpu_seconds, die_with_parent
from bench.services import API_KEY, SITE_ID, Server, get_json, simulator_state

# A run slower than this many records per second is cut off by its timeout.
SLOWEST_RECORDS_PER_S = 2_000
MIN_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Context:
    """What every phase needs: where the data is and where logs go."""

    bootstrap: str
    topics: Topics
    records: int
    work_dir: Path
    broker_pid: int | None


def timeout_for(records: int) -> float:
    return max(MIN_TIMEOUT_S, records / SLOWEST_RECORDS_PER_S)


def worker_env(
    ctx: Context, topics: Topics, simulator: Server, group: str, **extra: str
) -> dict[str, str]:
    """The worker's normal settings, pointed at the benchmark's services."""
    return dict(
        os.environ,
        CIO_SITE_ID=SITE_ID,
        CIO_API_KEY=API_KEY,
        CIO_TRACK__BASE_URL=simulator.url,
        CIO_KAFKA__BOOTSTRAP_SERVERS=ctx.bootstrap,
        CIO_KAFKA__GROUP_ID=group,
        CIO_KAFKA__PERSON_TOPIC=topics.person,
        CIO_KAFKA__EVENT_TOPIC=topics.event,
        CIO_KAFKA__DEAD_LETTER_TOPIC=topics.dead_letter,
        CIO_LOG__FORMAT="json",
        **extra,
    )


def rate(records: float, seconds: float) -> float:
    return round(records / seconds, 1) if seconds > 0 else 0.0


def run_ceiling(ctx: Context) -> dict[str, Any]:
    """A: consume and decode every record, nothing else."""
    run = run_child(
        [sys.executable, "-m", "bench.ceiling", *_topic_args(ctx), "--records",
         str(ctx.records), "--timeout-s", str(timeout_for(ctx.records))],
        dict(os.environ),
        timeout_s=timeout_for(ctx.records) + 30,
        log_path=ctx.work_dir / "ceiling.log",
    )  # fmt: skip
    return _reader_result(run, ctx.records)


def run_naive(ctx: Context, stub: Server, sample: int) -> dict[str, Any]:
    """C: one official-client call per record, on a sample, extrapolated."""
    env = dict(os.environ, CIO_SITE_ID=SITE_ID, CIO_API_KEY=API_KEY)
    run = run_child(
        [sys.executable, "-m", "bench.naive", "--url", stub.url, *_topic_args(ctx),
         "--records", str(sample), "--timeout-s", str(timeout_for(sample))],
        env,
        timeout_s=timeout_for(sample) + 30,
        log_path=ctx.work_dir / "naive.log",
    )  # fmt: skip
    result = _reader_result(run, sample)
    result["stub_counts"] = get_json(stub.url + "/__stub/state")
    result["sample_records"] = sample
    result["extrapolated_seconds_for_all"] = round(
        ctx.records / max(result["records_per_s"], 1e-9), 1
    )
    return result


def _topic_args(ctx: Context) -> list[str]:
    return [
        "--bootstrap", ctx.bootstrap,
        "--person-topic", ctx.topics.person,
        "--event-topic", ctx.topics.event,
    ]  # fmt: skip


def _reader_result(run: ChildRun, expected: int) -> dict[str, Any]:
    summary = run.last_json().get("summary", {})
    records = int(summary.get("records", 0))
    wall_s = run.usage.wall_s
    return {
        "records": records,
        "expected": expected,
        "exit_code": run.usage.exit_code,
        "wall_s": round(wall_s, 2),
        "records_per_s": rate(records, wall_s),
        "records_per_s_after_first": rate(
            records, summary.get("seconds", 0) - summary.get("first_record_s", 0)
        ),
        "cpu_s": round(run.usage.cpu_s, 2),
        "cpu_s_per_million": round(run.usage.cpu_s / max(records, 1) * 1e6, 1),
        "peak_rss_mb": round(run.usage.peak_rss_mb, 1),
        "trace": run.trace,
    }


def run_worker(
    ctx: Context,
    simulator: Server,
    label: str,
    *,
    extra_env: dict[str, str] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """B (and R, P): ``python -m worker run --until-caught-up`` on the backlog."""
    group = f"{ctx.topics.person.split('.')[0]}-{label}"
    env = worker_env(ctx, ctx.topics, simulator, group, **(extra_env or {}))
    progress = GroupProgress(
        ctx.bootstrap, group, [ctx.topics.person, ctx.topics.event]
    )
    cpu_before = _others_cpu(ctx, simulator)
    log_path = ctx.work_dir / f"worker-{label}.log"
    run = run_child(
        [sys.executable, "-m", "worker", "run", "--until-caught-up"],
        env,
        timeout_s=timeout_for(ctx.records),
        log_path=log_path,
        progress=progress,
        on_start=on_start,
    )
    progress.close()
    cpu_after = _others_cpu(ctx, simulator)
    counters = run.last_json()
    state, state_s = simulator_state(simulator)
    stats = state["stats"]
    consumed = int(counters.get("consumed", 0))
    wall_s = run.usage.wall_s
    trace = [(t, min(n, ctx.records)) for t, n in run.trace]
    return {
        "group": group,
        "exit_code": run.usage.exit_code,
        "timed_out": run.timed_out,
        "counters": counters,
        "records": consumed,
        "wall_s": round(wall_s, 2),
        "records_per_s": rate(consumed, wall_s),
        "records_per_s_steady": steady_rate(trace, ctx.records),
        "cpu_s": round(run.usage.cpu_s, 2),
        "cpu_s_per_million": round(run.usage.cpu_s / max(consumed, 1) * 1e6, 1),
        "peak_rss_mb": round(run.usage.peak_rss_mb, 1),
        "simulator": _simulator_figures(stats),
        "simulator_state_fetch_s": round(state_s, 2),
        "log_totals": batch_log_totals(log_path),
        "cpu_s_during_phase": {
            name: round(cpu_after[name] - cpu_before[name], 2)
            for name in cpu_before
            if cpu_before[name] is not None and cpu_after[name] is not None
        },
        "trace": trace,
        "rss_trace": run.rss_mb,
    }


def _others_cpu(ctx: Context, simulator: Server) -> dict[str, float | None]:
    return {"simulator": simulator.cpu_s(), "broker": cpu_seconds(ctx.broker_pid)}


def _simulator_figures(stats: dict[str, Any]) -> dict[str, Any]:
    requests = max(int(stats["requests"]), 1)
    return {
        "requests": stats["requests"],
        "entries_received": stats["entries_received"],
        "entries_accepted": stats["entries_accepted"],
        "entries_rejected": stats["entries_rejected"],
        "bytes_received": stats["bytes_received"],
        "max_request_bytes_seen": stats["max_request_bytes_seen"],
        "rate_limited": stats["rate_limited"],
        "responses": stats["responses"],
        "mean_entries_per_request": round(stats["entries_received"] / requests, 1),
        "mean_bytes_per_request": round(stats["bytes_received"] / requests),
    }


def steady_rate(trace: list[tuple[float, int]], total: int) -> float:
    """Records per second between 10 % and 90 % of the total committed."""
    low = next((p for p in trace if p[1] >= total * 0.1), None)
    high = next((p for p in trace if p[1] >= total * 0.9), None)
    if low is None or high is None or high[0] <= low[0]:
        return 0.0
    return rate(high[1] - low[1], high[0] - low[0])


def profile_worker(
    ctx: Context, simulator: Server, out_dir: Path, rate_hz: int = 100
) -> dict[str, Any]:
    """P: B again with py-spy attached; returns the run and the profile path."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    raw = out_dir / "profile-worker.collapsed.txt"
    spies: list[subprocess.Popen[bytes]] = []

    def attach(pid: int) -> None:
        command = [
            py_spy, "record", "--pid", str(pid), "--rate", str(rate_hz),
            "--format", "raw", "--nolineno", "--output", str(raw),
        ]  # fmt: skip
        log = (ctx.work_dir / "py-spy.log").open("wb")
        spies.append(
            subprocess.Popen(
                command, stdout=log, stderr=log, preexec_fn=die_with_parent
            )
        )

    result = run_worker(ctx, simulator, "profile", on_start=attach)
    for spy in spies:
        try:
            spy.wait(60)
        except subprocess.TimeoutExpired:
            spy.terminate()
    result["profile"] = str(raw) if raw.exists() else None
    if not raw.exists():
        result["profile_error"] = (ctx.work_dir / "py-spy.log").read_text()[-2000:]
    return result
