"""Hot spots from a py-spy profile in collapsed-stack form.

``py-spy record --format raw --nolineno`` writes one line per distinct stack,
``frame;frame;...;leaf count``, root first, each frame ``function (file)``.
Recorded with ``--gil``, a sample is the stack of the thread holding the GIL:
the shares are of the process's Python CPU time. Time inside a C extension
that keeps the GIL (fastavro's Cython reader, the json C encoder, a
librdkafka call) is charged to the Python function that called it.

The collapsed file opens in speedscope as it is; ``speedscope_json`` also
writes speedscope's own format, weighted, so it stays small.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

TOP = 20


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def hot_spots(stacks: list[tuple[list[str], int]], top: int = TOP) -> dict[str, Any]:
    """Self and inclusive sample shares per function, the largest first."""
    total = sum(count for _, count in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        own[_short(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": n, "percent": round(100 * n / total, 1)}
            for name, n in counter.most_common(top)
        ]

    return {"samples": total, "self": share(own), "inclusive": share(inclusive)}


def _short(frame: str) -> str:
    """``name (/long/path/site-packages/pkg/mod.py)`` -> ``name (pkg/mod.py)``."""
    name, _, path = frame.partition(" (")
    path = path.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def text_report(spots: dict[str, Any], rate_hz: int) -> str:
    lines = [
        f"py-spy --gil, {rate_hz} Hz: {spots['samples']:,} samples of the thread "
        f"holding the GIL (about {spots['samples'] / rate_hz:,.0f} s).",
        "",
        "Self time (the function itself, C calls it makes included):",
    ]
    lines += [f"  {s['percent']:5.1f} %  {s['function']}" for s in spots["self"]]
    lines += ["", "Inclusive time (the function and everything it calls):"]
    lines += [f"  {s['percent']:5.1f} %  {s['function']}" for s in spots["inclusive"]]
    return "\n".join(lines) + "\n"


def speedscope_json(stacks: list[tuple[list[str], int]], name: str) -> dict[str, Any]:
    """A weighted 'sampled' speedscope profile: one sample per distinct stack."""
    index: dict[str, int] = {}
    samples, weights = [], []
    for frames, count in stacks:
        samples.append([index.setdefault(_short(f), len(index)) for f in frames])
        weights.append(count)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": frame} for frame in index]},
        "profiles": [
            {
                "type": "sampled",
                "name": name,
                "unit": "none",
                "startValue": 0,
                "endValue": sum(weights),
                "samples": samples,
                "weights": weights,
            }
        ],
        "name": name,
        "exporter": "bench/profile.py",
    }


def summarise(collapsed: Path, rate_hz: int, title: str) -> dict[str, Any]:
    """Write the text report and the speedscope file beside ``collapsed``
    (``profile-NAME.collapsed.txt``); return the hot spots."""
    stacks = read_collapsed(collapsed)
    spots = hot_spots(stacks)
    stem = collapsed.name.removesuffix(".collapsed.txt")
    (collapsed.parent / f"{stem}.txt").write_text(
        f"{title}\n" + text_report(spots, rate_hz)
    )
    speedscope = speedscope_json(stacks, title)
    (collapsed.parent / f"{stem}.speedscope.json").write_text(json.dumps(speedscope))
    return spots
