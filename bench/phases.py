"""The measured phases: A (ceiling), B (worker), C (naive loop), R (B under a
rate limit) and P (B under the profiler). L, the latency phase, is in
``bench.latency``. Each returns plain data for ``latest.json``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data import Topics
from bench.monitor import ChildRun, GroupProgress, batch_log_totals, run_child
from bench.procstat import CpuLedger, die_with_parent
from bench.services import API_KEY, SITE_ID, Server, get_json, simulator_state

# A run slower than this many records per second is cut off by its timeout.
SLOWEST_RECORDS_PER_S = 2_000
MIN_TIMEOUT_S = 120.0
STARTS = 2


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
    ledger = CpuLedger({"broker": ctx.broker_pid})
    run = run_child(
        [sys.executable, "-m", "bench.ceiling", *_topic_args(ctx), "--records",
         str(ctx.records), "--timeout-s", str(timeout_for(ctx.records))],
        dict(os.environ),
        timeout_s=timeout_for(ctx.records) + 30,
        log_path=ctx.work_dir / "ceiling.log",
    )  # fmt: skip
    return {
        **_reader_result(run, ctx.records),
        "cpu_s_during_phase": ledger.close(run.usage.cpu_s),
    }


def run_naive(ctx: Context, stub: Server, sample: int) -> dict[str, Any]:
    """C: one official-client call per record, on a sample, extrapolated."""
    env = dict(os.environ, CIO_SITE_ID=SITE_ID, CIO_API_KEY=API_KEY)
    ledger = CpuLedger({"v1 stub": stub.pid, "broker": ctx.broker_pid})
    run = run_child(
        [sys.executable, "-m", "bench.naive", "--url", stub.url, *_topic_args(ctx),
         "--records", str(sample), "--timeout-s", str(timeout_for(sample))],
        env,
        timeout_s=timeout_for(sample) + 30,
        log_path=ctx.work_dir / "naive.log",
    )  # fmt: skip
    result = _reader_result(run, sample)
    result["cpu_s_during_phase"] = ledger.close(run.usage.cpu_s)
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
    ctx: Context, simulator: Server, label: str, **options: Any
) -> dict[str, Any]:
    """B (and R, P): ``python -m worker run --until-caught-up`` on the backlog.

    With ``window_s`` the worker gets SIGTERM after that long if it has not
    caught up, and rates are taken over the window it delivered in. A worker
    that fails before delivering anything is started once more (in a new
    group), and the failure is kept in ``failed_starts``.
    """
    failures: list[str] = []
    for attempt in range(1, STARTS + 1):
        result = _run_worker_once(ctx, simulator, f"{label}{attempt}", **options)
        if result["exit_code"] == 0 or result["records"] or attempt == STARTS:
            break
        log = ctx.work_dir / f"worker-{label}{attempt}.log"
        failures.append(log.read_text(errors="replace")[-1500:])
    result["failed_starts"] = failures
    return result


def _run_worker_once(
    ctx: Context,
    simulator: Server,
    label: str,
    *,
    extra_env: dict[str, str] | None = None,
    on_start: Callable[[int], None] | None = None,
    window_s: float | None = None,
    fetch_state: bool = True,
) -> dict[str, Any]:
    group = f"{ctx.topics.person.split('.')[0]}-{label}"
    env = worker_env(ctx, ctx.topics, simulator, group, **(extra_env or {}))
    progress = GroupProgress(
        ctx.bootstrap, group, [ctx.topics.person, ctx.topics.event]
    )
    ledger = CpuLedger({"simulator": simulator.pid, "broker": ctx.broker_pid})
    log_path = ctx.work_dir / f"worker-{label}.log"
    started = time.monotonic()
    run = run_child(
        [sys.executable, "-m", "worker", "run", "--until-caught-up"],
        env,
        timeout_s=timeout_for(ctx.records),
        log_path=log_path,
        progress=progress,
        on_start=on_start,
        stop_when=None
        if window_s is None
        else lambda: time.monotonic() - started > window_s,
    )
    progress.close()
    cpu = ledger.close(run.usage.cpu_s)
    counters = run.last_json()
    consumed = int(counters.get("consumed", 0)) or progress.last
    trace = [(t, min(n, ctx.records)) for t, n in run.trace]
    result = {
        "group": group,
        "exit_code": run.usage.exit_code,
        "timed_out": run.timed_out,
        "caught_up": consumed >= ctx.records,
        "counters": counters,
        "records": consumed,
        "wall_s": round(run.usage.wall_s, 2),
        "records_per_s": rate(consumed, run.usage.wall_s),
        "records_per_s_steady": steady_rate(trace, ctx.records),
        "records_per_s_delivering": delivering_rate(trace),
        "cpu_s": round(run.usage.cpu_s, 2),
        "cpu_s_per_million": round(run.usage.cpu_s / max(consumed, 1) * 1e6, 1),
        "peak_rss_mb": round(run.usage.peak_rss_mb, 1),
        "cpu_s_during_phase": cpu,
        "cpu_us_per_record": {
            name: round(cpu[name] / max(consumed, 1) * 1e6, 1)
            for name in ("measured process", "simulator", "broker")
            if name in cpu
        },
        "log_totals": batch_log_totals(log_path),
        "trace": trace,
        "rss_trace": run.rss_mb,
    }
    if fetch_state:
        state, seconds = simulator_state(simulator)
        result["simulator"] = _simulator_figures(state["stats"])
        result["simulator_state_fetch_s"] = round(seconds, 2)
    return result


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


def delivering_rate(trace: list[tuple[float, int]]) -> float:
    """Records per second from the first commit to the last sample."""
    first = next((i for i, (_, n) in enumerate(trace) if n > 0), None)
    if first is None or first + 1 >= len(trace):
        return 0.0
    (t0, n0), (t1, n1) = trace[first], trace[-1]
    return rate(n1 - n0, t1 - t0)


def profile_worker(
    ctx: Context, simulator: Server, out_dir: Path, rate_hz: int, window_s: float
) -> dict[str, Any]:
    """P: B again for ``window_s`` with py-spy on the worker and the simulator.

    ``--gil`` samples only the thread holding the GIL: for these GIL-bound
    processes that is where their Python CPU goes (librdkafka's own threads
    and time in C without the GIL are not in it).
    """
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    outputs = {
        "worker": out_dir / "profile-worker.collapsed.txt",
        "simulator": out_dir / "profile-simulator.collapsed.txt",
    }
    spies: list[subprocess.Popen[bytes]] = []
    log = (ctx.work_dir / "py-spy.log").open("wb")

    def spy(pid: int, output: Path) -> None:
        output.unlink(missing_ok=True)
        command = [
            py_spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--gil",
            "--format", "raw", "--nolineno", "--output", str(output),
            "--duration", str(int(window_s)),
        ]  # fmt: skip
        spies.append(
            subprocess.Popen(
                command, stdout=log, stderr=log, preexec_fn=die_with_parent
            )
        )

    def attach(pid: int) -> None:
        spy(pid, outputs["worker"])
        spy(simulator.pid, outputs["simulator"])

    result = run_worker(
        ctx, simulator, "profile", on_start=attach, window_s=window_s,
        fetch_state=False,
    )  # fmt: skip
    for process in spies:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.terminate()
    log.close()
    result["profiles"] = {k: str(v) for k, v in outputs.items() if v.exists()}
    if len(result["profiles"]) < len(outputs):
        result["profile_error"] = (ctx.work_dir / "py-spy.log").read_text()[-2000:]
    return result
