"""The workspace's request rate: a token bucket shared by the sender threads.

Customer.io limits requests per workspace, not per process. Every replica of
the group therefore takes a share of the configured rate in proportion to the
input partitions it owns (``set_share``), so the group as a whole stays under
the limit without talking to each other. A 429 halves the rate at once; every
second without one gives back a tenth of the target, so a throttled worker
slows down quickly and recovers steadily (additive increase, multiplicative
decrease).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# The rate never falls below this fraction of its target, so a storm of 429s
# cannot stop delivery; the API's Retry-After still spaces the retries.
MIN_FRACTION = 0.05
RECOVERY_PER_S = 0.1  # fraction of the target regained per second without 429
DECREASE_FACTOR = 0.5
TOKEN_EPSILON = 1e-6


class RateLimiter:
    """A token bucket; ``acquire`` blocks until a request may be sent."""

    def __init__(
        self,
        requests_per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = requests_per_s
        self._share = 1.0
        self._fraction = 1.0  # of the target, lowered by 429s
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = 1.0
        self._updated = clock()
        self._last_throttle = -1e9

    @property
    def rate(self) -> float:
        """Requests per second this process may send now."""
        return self._limit * self._share * self._fraction

    @property
    def target(self) -> float:
        """Requests per second this process may send when not throttled."""
        return self._limit * self._share

    def set_share(self, owned: int, total: int) -> None:
        """Take the share of the workspace's rate that ``owned`` of ``total``
        partitions earn; a process owning none keeps a minimal share."""
        with self._lock:
            self._refill()
            self._share = max(owned, 0) / total if total > 0 else 1.0
            self._share = max(self._share, 1.0 / max(total, 1))

    def wait_time(self) -> float:
        """Take a token if one is there (0.0); else how long until one is."""
        with self._lock:
            self._refill()
            # The tolerance absorbs float rounding: a refill that lands a hair
            # under one token must not ask for a wait too small to move the clock.
            if self._tokens >= 1.0 - TOKEN_EPSILON:
                self._tokens = max(self._tokens - 1.0, 0.0)
                return 0.0
            return (1.0 - self._tokens) / max(self.rate, 1e-9)

    def acquire(self, sleep: Callable[[float], None]) -> float:
        """Block (through ``sleep``) until a token is taken; return seconds waited."""
        waited = 0.0
        while (wait_s := self.wait_time()) > 0:
            sleep(wait_s)
            waited += wait_s
        return waited

    def throttled(self) -> None:
        """The API answered 429: halve the rate and drop any saved-up tokens."""
        with self._lock:
            self._refill()
            self._fraction = max(MIN_FRACTION, self._fraction * DECREASE_FACTOR)
            self._tokens = min(self._tokens, 0.0)
            self._last_throttle = self._clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._updated, 0.0)
        self._updated = now
        if self._fraction < 1.0:
            self._fraction = min(1.0, self._fraction + RECOVERY_PER_S * elapsed)
        # A burst of at most one second's worth of requests.
        capacity = max(1.0, self.rate)
        self._tokens = min(capacity, self._tokens + elapsed * self.rate)
