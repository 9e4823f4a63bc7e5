"""The results of a run: ``latest.json``, the Markdown table and the chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# The targets: reported beside the figures, never asserted.
TARGET_WORKER_RECORDS_PER_S = 50_000
TARGET_SHARE_OF_CEILING = 0.40
TARGET_TIMES_NAIVE = 20
TARGET_PEAK_RSS_MB = 300
TARGET_RATE_LIMITED_EFFICIENCY = 0.90
TARGET_P99_MS = 500
CHART_WINDOW_S = 1.0


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and whether it was met (None: not run)."""
    worker = summary.get("worker_records_per_s")
    ceiling = summary.get("ceiling_records_per_s")
    naive = summary.get("naive_records_per_s")
    share = worker / ceiling if worker and ceiling else None
    times = worker / naive if worker and naive else None
    rows = [
        ("B >= 50,000 records/s", worker, TARGET_WORKER_RECORDS_PER_S, ">="),
        ("B >= 40 % of A", share, TARGET_SHARE_OF_CEILING, ">="),
        ("B >= 20x C", times, TARGET_TIMES_NAIVE, ">="),
        ("peak RSS <= 300 MB (whole backlog)", summary.get("peak_rss_mb"),
         TARGET_PEAK_RSS_MB, "<="),
        ("rate-limited efficiency >= 90 %", summary.get("rate_limited_efficiency"),
         TARGET_RATE_LIMITED_EFFICIENCY, ">="),
        ("p99 <= 500 ms at the offered load", summary.get("p99_latency_ms"),
         TARGET_P99_MS, "<="),
    ]  # fmt: skip
    return [
        {
            "target": name,
            "measured": None if value is None else round(value, 3),
            "met": None
            if value is None
            else (value >= bound if op == ">=" else value <= bound),
        }
        for name, value, bound, op in rows
    ]


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(path)


def markdown(summary: dict[str, Any]) -> str:
    """The tables the README can show."""
    phases = summary["phases"]
    a, b, c = phases.get("A", {}), phases.get("B", {}), phases.get("C", {})
    sim = b.get("simulator", {})
    stub = c.get("stub_counts", {})
    naive_requests = stub.get("identify", 0) + stub.get("track", 0)
    sample = c.get("sample_records")
    lines = [
        f"Records: {summary['records']:,} ({summary['data']['description']}); "
        f"machine: {_machine(summary['machine'])}.",
        "",
        "| | A: consume + decode | B: cio-worker | C: official client, "
        "one call per record |",
        "| --- | ---: | ---: | ---: |",
        _row("records/s", a.get("records_per_s"), b.get("records_per_s"),
             c.get("records_per_s")),
        _row("CPU s per million records", a.get("cpu_s_per_million"),
             b.get("cpu_s_per_million"), c.get("cpu_s_per_million")),
        _row("peak RSS (MB)", a.get("peak_rss_mb"), b.get("peak_rss_mb"),
             c.get("peak_rss_mb")),
        _row("requests", None, sim.get("requests"), naive_requests or None),
        _row("mean entries per request", None,
             sim.get("mean_entries_per_request"), 1 if naive_requests else None),
        _row("mean bytes per request", None, sim.get("mean_bytes_per_request"),
             round(stub["bytes"] / naive_requests) if naive_requests else None),
        _row("wall time (s)", a.get("wall_s"), b.get("wall_s"),
             c.get("extrapolated_seconds_for_all")),
        "",
    ]  # fmt: skip
    if sample:
        lines += [
            f"C ran on a sample of {sample:,} records against a loopback v1 stub "
            "(`bench/v1stub.py`); its wall time is extrapolated to all records.",
            "",
        ]
    lines += _target_table(summary) + _extra_lines(summary)
    return "\n".join(lines) + "\n"


def _target_table(summary: dict[str, Any]) -> list[str]:
    lines = ["| Target (from the issue) | Measured | Met |", "| --- | ---: | :---: |"]
    for row in summary["targets"]:
        met = {True: "yes", False: "**no**", None: "not run"}[row["met"]]
        lines.append(f"| {row['target']} | {_fmt(row['measured'])} | {met} |")
    return [*lines, ""]


def _extra_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for key in ("rate_limit", "rate_limit_binding"):
        limit = summary.get(key)
        if limit:
            lines.append(
                _limit_line(limit, summary.get("worker_records_per_s_delivering"))
            )
    for run in summary["phases"].get("L", []):
        lines.append(
            f"Latency at {run['offered_records_per_s']:,.0f} records/s offered, "
            f"linger_ms {run['linger_ms']}: p50 {_fmt(run['p50_ms'])} ms, p90 "
            f"{_fmt(run['p90_ms'])} ms, p99 {_fmt(run['p99_ms'])} ms, max "
            f"{_fmt(run['max_ms'])} ms over {run['events_measured']:,} events"
            + _warmup_text(run)
        )
    cpu = summary["phases"].get("B", {}).get("cpu_s_during_phase")
    if cpu:
        lines.append(
            "CPU seconds during B: worker "
            f"{_fmt(cpu['measured process'])}, simulator {_fmt(cpu.get('simulator'))},"
            f" broker {_fmt(cpu.get('broker'))}, benchmark driver "
            f"{_fmt(cpu['benchmark driver'])}, other processes on the machine "
            f"{_fmt(cpu['other processes'])}; {_fmt(cpu['machine capacity'])} "
            "available (2 cores x wall time)."
        )
    return [f"- {line}" for line in lines]


def _limit_line(limit: dict[str, Any], unlimited: float | None) -> str:
    line = (
        f"Simulator limited to {limit['rps']:g} requests/s: "
        f"{_fmt(limit['records_per_s'])} records/s of a ceiling of "
        f"{_fmt(limit['ceiling_records_per_s'])} ({limit['rps']:g} x "
        f"{limit['entries_per_request']:,} entries; 500,000 bytes hold "
        f"{limit['entries_by_bytes']:,} entries of {limit['mean_entry_bytes']:.0f} "
        f"bytes, max_entries caps at {limit['max_entries']:,}): efficiency "
        f"{limit['efficiency']:.0%}; {limit['requests_per_s']:g} requests/s sent, "
        f"{limit['mean_entries_per_request']:,.0f} entries each, "
        f"{limit['throttled']:,} retries after a 429."
    )
    if unlimited and unlimited < limit["ceiling_records_per_s"]:
        line += (
            f" This limit does not bind: without it the worker reached "
            f"{_fmt(unlimited)} records/s (B from its first commit on, as "
            "measured here)."
        )
    return line


def _row(name: str, *values: Any) -> str:
    return f"| {name} | " + " | ".join(_fmt(v) for v in values) + " |"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:,.2f}".rstrip("0").rstrip(".")
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _machine(machine: dict[str, Any]) -> str:
    return (
        f"{machine['cpu_model']}, {machine['cores']} cores, Python "
        f"{machine['python']}, Kafka {machine['kafka']}"
    )


def chart(summary: dict[str, Any], path: Path) -> str | None:
    """Throughput over time of A, B, C (and R), and the worker's memory."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart"
    phases = summary["phases"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True)
    names = {
        "A": "A: consume + decode (ceiling)",
        "B": "B: cio-worker",
        "C": "C: official client, one call per record",
        "R": "R: cio-worker, simulator at a rate limit",
    }
    colors = {"A": "tab:blue", "B": "tab:orange", "C": "tab:green", "R": "tab:red"}
    for key, label in names.items():
        trace = phases.get(key, {}).get("trace")
        if trace:
            times, rates = throughput(trace)
            top.plot(times, rates, label=label, linewidth=1.2, color=colors[key])
    top.set_yscale("log")
    top.set_ylabel("records per second (1 s window)")
    title = f"{summary['records']:,} records, 2 cores shared with the broker"
    cpu = phases.get("B", {}).get("cpu_s_during_phase")
    if cpu and cpu.get("machine capacity"):
        share = cpu["other processes"] / cpu["machine capacity"]
        title += f"; other processes used {share:.0%} of the CPU during B"
    top.set_title(title, fontsize=10)
    top.grid(True, which="both", alpha=0.3)
    top.legend(loc="lower right", fontsize=8)
    for key in ("B", "R"):
        rss = phases.get(key, {}).get("rss_trace")
        if rss:
            bottom.plot(
                [t for t, _ in rss], [m for _, m in rss], label=names[key],
                color=colors[key],
            )  # fmt: skip
    bottom.axhline(TARGET_PEAK_RSS_MB, color="grey", linestyle="--", linewidth=1)
    bottom.set_ylabel("worker RSS (MB)")
    bottom.set_xlabel("seconds since the process started")
    bottom.grid(True, alpha=0.3)
    bottom.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return None


def throughput(trace: list[Any]) -> tuple[list[float], list[float]]:
    """Records per second over a trailing window, from cumulative samples; a
    window with no progress is a gap (NaN) on the log scale."""
    times, rates = [], []
    base = 0
    for t, n in trace:
        while base + 1 < len(trace) and trace[base + 1][0] <= t - CHART_WINDOW_S:
            base += 1
        t0, n0 = trace[base]
        if t > t0:
            times.append(t)
            rates.append((n - n0) / (t - t0) if n > n0 else float("nan"))
    return times, rates


def _warmup_text(run: dict[str, Any]) -> str:
    """What the warm-up left out of a latency run, or just the full stop."""
    if not run.get("warmup_s") or not run.get("events_in_warmup"):
        return "."
    return (
        f", after a {_fmt(run['warmup_s'])} s warm-up ({run['events_in_warmup']:,} "
        f"events; with them p99 {_fmt(run.get('p99_ms_with_warmup'))} ms, max "
        f"{_fmt(run.get('max_ms_with_warmup'))} ms)."
    )
