"""CPU time and memory of processes, read from ``/proc`` (Linux only).

Children the benchmark starts itself are reaped with ``os.wait4``, whose
resource usage gives their exact CPU seconds and peak RSS at exit; the samples
taken while they run feed the charts and cover processes we did not start (the
broker, the simulator).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU seconds (user + system) and peak resident memory of a finished child."""

    exit_code: int
    cpu_s: float
    peak_rss_mb: float
    wall_s: float


def cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU seconds of a running process, or None if it is gone."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def memory_mb(pid: int) -> tuple[float, float] | None:
    """(VmRSS, VmHWM) of a running process in MiB, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    values = {}
    for line in status.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def reap(
    process: subprocess.Popen[bytes], started: float, *, block: bool
) -> Usage | None:
    """Collect a child's exit status and resource usage; None while it runs."""
    pid, status, rusage = os.wait4(process.pid, 0 if block else os.WNOHANG)
    if pid == 0:
        return None
    exit_code = os.waitstatus_to_exitcode(status)
    process.returncode = exit_code  # reaped here: Popen must not wait again
    return Usage(
        exit_code=exit_code,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        peak_rss_mb=rusage.ru_maxrss / 1024,
        wall_s=time.monotonic() - started,
    )


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(v) for v in fields[:8]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / CLOCK_TICKS_PER_S


def own_cpu_s() -> float:
    """CPU seconds of this process (the benchmark's driver)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuLedger:
    """Who used the machine's CPU during a phase: the measured child, the named
    helper processes, this driver, and everything else (other users' jobs)."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._start = {name: cpu_seconds(pid) for name, pid in pids.items()}
        self._machine = machine_busy_s()
        self._own = own_cpu_s()
        self._wall = time.monotonic()

    def close(self, child_cpu_s: float) -> dict[str, float]:
        wall = time.monotonic() - self._wall
        spent = {"measured process": child_cpu_s}
        for name, pid in self._pids.items():
            before, after = self._start[name], cpu_seconds(pid)
            if before is not None and after is not None:
                spent[name] = after - before
        spent["benchmark driver"] = own_cpu_s() - self._own
        machine = machine_busy_s() - self._machine
        spent["other processes"] = max(machine - sum(spent.values()), 0.0)
        spent["machine busy"] = machine
        spent["machine capacity"] = wall * (os.cpu_count() or 1)
        return {name: round(value, 2) for name, value in spent.items()}


def die_with_parent() -> None:
    """For ``Popen(preexec_fn=...)``: the child gets SIGTERM when we die, so a
    crashed or killed benchmark leaves no server or worker running."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    import confluent_kafka

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 1_048_576, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "kafka": kafka_version(),
        "confluent_kafka": confluent_kafka.version(),
        "librdkafka": confluent_kafka.libversion()[0],
    }


def kafka_version() -> str:
    """The broker's version, read from the cached jar names."""
    from worker.sandbox.broker import default_home

    for jar in sorted((default_home() / "libs").glob("kafka_2.*-*.jar")):
        return jar.stem.rsplit("-", 1)[1]
    return "unknown"
