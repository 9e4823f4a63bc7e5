"""Running one measured child process: its progress, CPU and memory over time.

A child either reports its own progress (JSON lines ``{"t": s, "n": records}``
on stdout, as ``bench.ceiling`` and ``bench.naive`` do) or is watched from the
outside through a ``progress`` callable (the worker: its consumer group's
committed offsets). Every run is bounded by a timeout, after which the child
gets SIGTERM and then SIGKILL.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from bench.procstat import Usage, die_with_parent, memory_mb, reap

SAMPLE_INTERVAL_S = 0.5
TERM_GRACE_S = 30.0
ADMIN_TIMEOUT_S = 5.0


@dataclass
class ChildRun:
    """What one child did: exit, resources, progress samples and its output."""

    usage: Usage
    trace: list[tuple[float, int]] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    timed_out: bool = False

    def last_json(self) -> dict[str, Any]:
        """The last JSON object the child printed (its summary or counters)."""
        for line in reversed(self.stdout):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "t" not in value:
                return value
        return {}


def run_child(
    argv: list[str],
    env: dict[str, str],
    *,
    timeout_s: float,
    log_path: Path,
    progress: Callable[[], int] | None = None,
    on_start: Callable[[int], None] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> ChildRun:
    """Run ``argv`` to its end (or ``stop_when``, or the timeout), sampling it."""
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            preexec_fn=die_with_parent,
        )
        lines: list[str] = []
        trace: list[tuple[float, int]] = []
        reader = threading.Thread(
            target=_read_lines, args=(process, lines, trace), daemon=True
        )
        reader.start()
        if on_start is not None:
            on_start(process.pid)
        run = _watch(process, started, timeout_s, progress, stop_when, trace)
        reader.join(TERM_GRACE_S)
    run.stdout = lines
    return run


def _watch(
    process: subprocess.Popen[bytes],
    started: float,
    timeout_s: float,
    progress: Callable[[], int] | None,
    stop_when: Callable[[], bool] | None,
    trace: list[tuple[float, int]],
) -> ChildRun:
    rss: list[tuple[float, float]] = []
    timed_out, stopping = False, False
    while True:
        usage = reap(process, started, block=False)
        if usage is not None:
            return ChildRun(usage, trace, rss, timed_out=timed_out)
        elapsed = time.monotonic() - started
        memory = memory_mb(process.pid)
        if memory is not None:
            rss.append((elapsed, memory[0]))
        if progress is not None:
            trace.append((elapsed, progress()))
        if not stopping and (elapsed > timeout_s or (stop_when and stop_when())):
            timed_out = elapsed > timeout_s
            stopping = True
            process.send_signal(signal.SIGTERM)
            threading.Timer(TERM_GRACE_S, _kill, args=(process,)).start()
        time.sleep(SAMPLE_INTERVAL_S)


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.returncode is None:
        process.kill()


def _read_lines(
    process: subprocess.Popen[bytes], lines: list[str], trace: list[tuple[float, int]]
) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.decode(errors="replace").strip()
        lines.append(line)
        if line.startswith('{"t"'):
            point = json.loads(line)
            trace.append((float(point["t"]), int(point["n"])))


class GroupProgress:
    """Records a consumer group has committed, summed over its partitions.

    Read with a consumer's ``committed`` (it never joins the group): the admin
    client's ``list_consumer_group_offsets`` crashed this process with a
    segfault in librdkafka 2.16.0 when the coordinator answered
    NOT_COORDINATOR (confluentinc/librdkafka#5040).
    """

    def __init__(self, bootstrap: str, group: str, topics: list[str]) -> None:
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": group, "log_level": 3}
        )
        metadata = self._consumer.list_topics(timeout=ADMIN_TIMEOUT_S)
        self._partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in metadata.topics[topic].partitions
        ]
        self.last = 0

    def __call__(self) -> int:
        try:
            committed = self._consumer.committed(
                self._partitions, timeout=ADMIN_TIMEOUT_S
            )
        except KafkaException:  # nothing committed yet, or a slow answer
            return self.last
        self.last = max(
            self.last, sum(max(tp.offset, 0) for tp in committed if tp.error is None)
        )
        return self.last

    def close(self) -> None:
        self._consumer.close()


def batch_log_totals(log_path: Path) -> dict[str, float]:
    """Sum the worker's ``batch_sent`` and ``batch_retry`` log events."""
    batches = entries = size = requests = retries = throttled = 0
    latency_ms = 0.0
    with log_path.open(errors="replace") as log:
        for line in log:
            if '"batch_retry"' in line:
                retries += 1
                throttled += json.loads(line).get("status") == 429
            if '"batch_sent"' not in line:
                continue
            event = json.loads(line)
            batches += 1
            entries += event.get("entries", 0)
            size += event.get("bytes", 0)
            requests += event.get("requests", 0)
            latency_ms += event.get("latency_ms", 0.0)
    return {
        "batches": batches,
        "entries": entries,
        "bytes": size,
        "requests": requests,
        "retries": retries,
        "retries_after_429": throttled,
        "mean_entries_per_request": round(entries / max(requests, 1), 1),
        "mean_bytes_per_request": round(size / max(requests, 1)),
        "mean_request_latency_ms": round(latency_ms / max(requests, 1), 1),
    }
