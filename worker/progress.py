"""Progress of a bounded job (replay, redrive): a bar on a terminal, log lines
otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

import structlog

log = structlog.get_logger(__name__)

TERMINAL_INTERVAL_S = 0.5
LOG_INTERVAL_S = 5.0
BAR_WIDTH = 30


class Progress:
    """Reports records done out of a total, the rate and the time left."""

    def __init__(
        self,
        label: str,
        total: int,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = max(total, 0)
        self._stream = stream or sys.stderr
        self._terminal = self._stream.isatty()
        self._clock = clock
        self._started = clock()
        self._next = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        """Show progress if the interval has passed (or ``final``)."""
        now = self._clock()
        if now < self._next and not final:
            return
        interval = TERMINAL_INTERVAL_S if self._terminal else LOG_INTERVAL_S
        self._next = now + interval
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        left = (self.total - done) / rate if rate > 0 and done < self.total else 0.0
        if self._terminal:
            self._stream.write(
                "\r" + render_bar(self.label, done, self.total, rate, left)
            )
            if final:
                self._stream.write("\n")
            self._stream.flush()
        else:
            log.info(
                "progress",
                job=self.label,
                done=done,
                total=self.total,
                rate_per_s=round(rate, 1),
                seconds_left=round(left, 1),
            )


def render_bar(label: str, done: int, total: int, rate: float, left_s: float) -> str:
    """One terminal line: label, bar, counts, rate and time left."""
    fraction = min(done / total, 1.0) if total else 1.0
    filled = int(fraction * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    minutes, seconds = divmod(int(left_s), 60)
    return (
        f"{label} [{bar}] {done:,}/{total:,} records  {rate:,.0f}/s  "
        f"left {minutes}:{seconds:02d}"
    )
