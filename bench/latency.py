"""Phase L: latency from produce to acceptance at a steady offered load.

The worker runs always-on (``python -m worker run``, no ``--until-caught-up``)
on fresh topics. Once it has its partitions, a producer thread writes the usual
mix at a fixed rate for a fixed time; every event carries the wall-clock
microsecond it was produced in its data (``bench_sent_us``). When everything
produced is committed the worker gets SIGTERM, and each event's latency is the
simulator's ``accepted_at`` minus that send time (one machine, one clock).

The first ``warmup_s`` of the load are a warm-up, left out of the percentiles
and reported beside them (``p99_ms_with_warmup``): the worker has just joined
its group and the benchmark's broker has just started, so its first records
wait for the consumer's first fetch and for coordinators still loading, which
says nothing about the steady load the phase measures.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from bench.data import RecordMaker, Topics, bulk_producer, paced, produce
from bench.monitor import GroupProgress, batch_log_totals, run_child
from bench.phases import Context, worker_env
from bench.services import Server, reset_simulator, simulator_state

READY_TIMEOUT_S = 90.0
DRAIN_TIMEOUT_S = 120.0
FLUSH_TIMEOUT_S = 30.0
# The producer's own linger: small, so it adds little to what is measured.
PRODUCER_LINGER_MS = 5
# A worker that dies before it is assigned its partitions is started again.
STARTS = 2
LATENCY_WINDOW_S = 5


class SteadyProducer(threading.Thread):
    """Writes ``rate_per_s`` records a second for ``duration_s`` once ``ready``."""

    def __init__(
        self, ctx: Context, topics: Topics, rate_per_s: float, duration_s: float
    ) -> None:
        super().__init__(name="bench-steady-producer", daemon=True)
        self.ctx, self.topics = ctx, topics
        self.rate_per_s, self.duration_s = rate_per_s, duration_s
        self.ready = threading.Event()
        self.done = threading.Event()
        self._cancelled = False
        self.produced = 0
        self.events = 0
        self.seconds = 0.0

    def run(self) -> None:
        try:
            if self.ready.wait(READY_TIMEOUT_S) and not self._cancelled:
                self._produce()
        finally:
            self.done.set()

    def cancel(self) -> None:
        """Release the thread; it writes nothing if it had not started."""
        self._cancelled = not self.ready.is_set()
        self.ready.set()

    def _produce(self) -> None:
        people = max(int(self.rate_per_s * self.duration_s * 0.3), 1)
        maker = RecordMaker(people, seed=11)
        producer = bulk_producer(self.ctx.bootstrap, PRODUCER_LINGER_MS)
        names = {"person": self.topics.person, "event": self.topics.event}
        started = time.monotonic()
        for _ in paced(self.rate_per_s, self.duration_s):
            kind, key, record = maker.next_record()
            if kind == "event":
                sent_us = time.time_ns() // 1000
                record["data"] = {**record["data"], "bench_sent_us": sent_us}
                self.events += 1
            produce(producer, names[kind], key, maker.encode(kind, record))
            self.produced += 1
        producer.flush(FLUSH_TIMEOUT_S)
        self.seconds = time.monotonic() - started


def run_latency(
    ctx: Context,
    simulator: Server,
    *,
    rate_per_s: float,
    duration_s: float,
    linger_ms: int,
    warmup_s: float = 0.0,
) -> dict[str, Any]:
    """Offer a steady load to an always-on worker; return latency percentiles.

    A worker that fails before it has its partitions is started once more on
    fresh topics, and the failure is reported beside the result.
    """
    failures: list[str] = []
    for attempt in range(1, STARTS + 1):
        result = _attempt(ctx, simulator, rate_per_s, duration_s, linger_ms, warmup_s)
        if result["exit_code"] == 0 or result["produced"] or attempt == STARTS:
            break
        failures.append(result.pop("log_tail"))
    result.pop("log_tail", None)
    result["failed_starts"] = failures
    return result


def _attempt(
    ctx: Context,
    simulator: Server,
    rate_per_s: float,
    duration_s: float,
    linger_ms: int,
    warmup_s: float,
) -> dict[str, Any]:
    topics = Topics.fresh(f"latency{linger_ms}")
    topics.create(ctx.bootstrap)
    reset_simulator(simulator)
    group = f"{topics.person.split('.')[0]}-worker"
    env = worker_env(ctx, topics, simulator, group, CIO_BATCH__LINGER_MS=str(linger_ms))
    log_path = ctx.work_dir / f"worker-latency-{linger_ms}.log"
    progress = GroupProgress(ctx.bootstrap, group, [topics.person, topics.event])
    producer = SteadyProducer(ctx, topics, rate_per_s, warmup_s + duration_s)
    producer.start()

    def stop_when() -> bool:
        if not producer.ready.is_set() and b"partitions_assigned" in _read(log_path):
            producer.ready.set()
        return producer.done.is_set() and progress.last >= producer.produced

    run = run_child(
        [sys.executable, "-m", "worker", "run"],
        env,
        timeout_s=READY_TIMEOUT_S + warmup_s + duration_s + DRAIN_TIMEOUT_S,
        log_path=log_path,
        progress=progress,
        stop_when=stop_when,
    )
    progress.close()
    producer.cancel()
    producer.join(warmup_s + duration_s + FLUSH_TIMEOUT_S + 10)
    state, _ = simulator_state(simulator)
    sent_and_latency = sorted(
        (
            event["attributes"]["bench_sent_us"] / 1e6,
            event["accepted_at"] * 1000 - event["attributes"]["bench_sent_us"] / 1000,
        )
        for event in state["events"]
        if "bench_sent_us" in event.get("attributes", {})
    )
    first_sent = sent_and_latency[0][0] if sent_and_latency else 0.0
    latencies = sorted(
        latency for sent, latency in sent_and_latency if sent >= first_sent + warmup_s
    )
    with_warmup = sorted(latency for _, latency in sent_and_latency)
    totals = batch_log_totals(log_path)
    return {
        "linger_ms": linger_ms,
        "offered_records_per_s": rate_per_s,
        "achieved_offered_records_per_s": round(
            producer.produced / max(producer.seconds, 1e-9), 1
        ),
        "produced": producer.produced,
        "events_produced": producer.events,
        "warmup_s": warmup_s,
        "events_in_warmup": len(with_warmup) - len(latencies),
        "events_measured": len(latencies),
        "exit_code": run.usage.exit_code,
        "worker_cpu_s": round(run.usage.cpu_s, 2),
        "worker_peak_rss_mb": round(run.usage.peak_rss_mb, 1),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "p99_ms_with_warmup": percentile(with_warmup, 99),
        "max_ms_with_warmup": round(with_warmup[-1], 1) if with_warmup else None,
        "p50_ms_by_window": _by_window(sent_and_latency, 50),
        "p99_ms_by_window": _by_window(sent_and_latency, 99),
        "requests_per_s": round(totals["requests"] / max(producer.seconds, 1e-9), 1),
        "mean_entries_per_request": totals["mean_entries_per_request"],
        "mean_request_latency_ms": totals["mean_request_latency_ms"],
        "log_tail": _read(log_path)[-1500:].decode(errors="replace"),
    }


def _by_window(points: list[tuple[float, float]], pct: float) -> list[list[float]]:
    """[seconds since the first send, percentile ms] per LATENCY_WINDOW_S of
    sends."""
    if not points:
        return []
    first = min(sent for sent, _ in points)
    windows: dict[int, list[float]] = {}
    for sent, latency in points:
        windows.setdefault(int((sent - first) // LATENCY_WINDOW_S), []).append(latency)
    return [
        [index * LATENCY_WINDOW_S, percentile(sorted(values), pct) or 0.0]
        for index, values in sorted(windows.items())
    ]


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, round(pct / 100 * len(values)))
    return round(values[min(rank, len(values)) - 1], 1)


def _read(path: Any) -> bytes:
    try:
        return bytes(path.read_bytes())
    except FileNotFoundError:
        return b""
