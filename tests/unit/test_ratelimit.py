"""The workspace token bucket."""

from __future__ import annotations

import pytest

from worker.ratelimit import MIN_FRACTION, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_acquire_spaces_requests_at_the_rate() -> None:
    """After the first request, requests are spaced by 1 / rate seconds."""
    clock = Clock()
    limiter = RateLimiter(10.0, clock=clock)

    waits = [limiter.acquire(clock.sleep) for _ in range(21)]

    assert waits[0] == 0.0
    assert clock.now == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("owned", "total", "rate"),
    [(6, 6, 100.0), (2, 6, 100 / 3), (3, 6, 50.0), (0, 6, 100 / 6), (1, 0, 100.0)],
)
def test_set_share_is_proportional_to_partitions_owned(
    owned: int, total: int, rate: float
) -> None:
    """Each replica takes the share of the workspace rate its partitions earn."""
    limiter = RateLimiter(100.0, clock=Clock())

    limiter.set_share(owned, total)

    assert limiter.rate == pytest.approx(rate)


def test_shares_of_three_replicas_add_up_to_the_limit() -> None:
    """Replicas owning 2, 2 and 2 of 6 partitions together send at the limit."""
    limiters = [RateLimiter(100.0, clock=Clock()) for _ in range(3)]

    for limiter in limiters:
        limiter.set_share(2, 6)

    assert sum(limiter.rate for limiter in limiters) == pytest.approx(100.0)


def test_throttled_halves_the_rate_down_to_a_floor() -> None:
    """Each 429 halves the rate, never below the floor."""
    limiter = RateLimiter(100.0, clock=Clock())

    limiter.throttled()
    halved = limiter.rate
    for _ in range(20):
        limiter.throttled()

    assert halved == pytest.approx(50.0)
    assert limiter.rate == pytest.approx(100.0 * MIN_FRACTION)


def test_rate_recovers_steadily_after_throttling() -> None:
    """Without 429s the rate climbs back to its target within ten seconds."""
    clock = Clock()
    limiter = RateLimiter(100.0, clock=clock)
    limiter.throttled()

    clock.now += 2.0
    limiter.wait_time()
    partial = limiter.rate
    clock.now += 10.0
    limiter.wait_time()

    assert 50.0 < partial < 100.0
    assert limiter.rate == pytest.approx(100.0)


def test_burst_is_at_most_one_second_of_requests() -> None:
    """Idle time saves up at most one second's worth of tokens."""
    clock = Clock()
    limiter = RateLimiter(5.0, clock=clock)
    clock.now += 60.0

    free = 0
    while limiter.wait_time() == 0.0:
        free += 1

    assert free == 5
