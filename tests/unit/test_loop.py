"""Unit tests of the consumer loop's rebalance handling, with a fake consumer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from structlog.testing import capture_logs

from worker import loop
from worker.errors import WorkerError
from worker.loop import REJOIN_LOG_INTERVAL_S, REJOIN_MARGIN_S, Worker
from worker.settings import KafkaSettings, Settings
from worker.state import PartitionState

MAX_POLL_INTERVAL_S = 10.0
SESSION_TIMEOUT_S = 6.0
# Two rebalances at max.poll.interval.ms, a session timeout and the margin.
REJOIN_LIMIT_S = 2 * MAX_POLL_INTERVAL_S + SESSION_TIMEOUT_S + REJOIN_MARGIN_S


class FakeConsumer:
    """Stands in for confluent_kafka.Consumer: no messages, no partitions."""

    def __init__(self) -> None:
        self.resumed: list[TopicPartition] = []

    def consume(self, num_messages: int, timeout: float) -> list[Any]:
        return []

    def assignment(self) -> list[TopicPartition]:
        return []

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.resumed += partitions

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return partitions

    def get_watermark_offsets(self, partition: Any, cached: bool) -> tuple[int, int]:
        return 0, 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def worker(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    def no_restore(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test reached for the state topic")

    monkeypatch.setattr(loop, "restore", no_restore)
    settings = Settings(
        site_id="site",
        api_key="key",
        kafka=KafkaSettings(
            person_topic="persons",
            event_topic="events",
            dead_letter_topic="dead-letters",
            max_poll_interval_ms=int(MAX_POLL_INTERVAL_S * 1000),
            session_timeout_ms=int(SESSION_TIMEOUT_S * 1000),
        ),
    )
    worker = Worker(settings, clock=clock)
    worker._consumer = FakeConsumer()  # type: ignore[assignment]
    worker._input_partitions = 2
    worker._states[0] = PartitionState()  # partition 0's state, already restored
    try:
        yield worker
    finally:
        worker._pool.shutdown(wait=False)
        worker._client.close()


def _lose_everything(worker: Worker) -> None:
    assert worker._consumer is not None
    lost = [TopicPartition("persons", 0), TopicPartition("events", 0)]
    worker._on_assign(worker._consumer, lost)
    worker._on_lost(worker._consumer, lost)


def _turn_until(worker: Worker, clock: Clock, until: float) -> None:
    """Turn the loop every second of the fake clock up to ``until``."""
    while clock.now < until:
        clock.now = min(clock.now + 1.0, until)
        worker._run_once()


def test_lost_partitions_not_given_back_warn_then_stop_the_worker(
    worker: Worker, clock: Clock
) -> None:
    """After a loss, a group that never assigns again is reported once a minute,
    and past the limit the worker stops: it owns nothing, and a restart joins
    the group afresh instead of idling for good."""
    lost_at = clock.now
    _lose_everything(worker)

    with capture_logs() as logs:
        _turn_until(worker, clock, lost_at + REJOIN_LIMIT_S - 1)
    warnings = [e for e in logs if e["event"] == "group_rejoin_slow"]
    with pytest.raises(WorkerError, match="assigned this worker no partitions"):
        _turn_until(worker, clock, lost_at + REJOIN_LIMIT_S)

    assert [w["seconds"] for w in warnings] == [60]
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["client_assignment"] == 0
    assert warnings[0]["stops_in_s"] == round(REJOIN_LIMIT_S - REJOIN_LOG_INTERVAL_S)
    assert not worker._buffers


def test_any_assignment_after_a_loss_ends_the_wait(
    worker: Worker, clock: Clock
) -> None:
    """The group calls on_assign at the end of every rebalance, with no
    partitions for a member it gives none: that ends the wait too."""
    _lose_everything(worker)
    _turn_until(worker, clock, clock.now + 30)
    assert worker._consumer is not None

    worker._on_assign(worker._consumer, [])
    with capture_logs() as logs:
        _turn_until(worker, clock, clock.now + 3 * REJOIN_LIMIT_S)

    assert not [e for e in logs if e["event"] == "group_rejoin_slow"]


def test_wait_starts_at_the_loss_and_not_again_on_a_second_loss(
    worker: Worker, clock: Clock
) -> None:
    """The wait counts from the first loss; the warning says how long it is."""
    assert worker._consumer is not None
    lost_at = clock.now
    _lose_everything(worker)
    clock.now += 30
    worker._on_lost(worker._consumer, [])

    with capture_logs() as logs:
        _turn_until(worker, clock, lost_at + REJOIN_LOG_INTERVAL_S + 1)

    warnings = [e for e in logs if e["event"] == "group_rejoin_slow"]
    assert [w["seconds"] for w in warnings] == [60]
