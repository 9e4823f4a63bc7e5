"""Unit tests of worker.metrics: what each call exports, and what it costs."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.errors import CredentialsError, TransientError
from worker.metrics import Metrics, consumer_lags, lag_of, retry_reason
from worker.track import ThrottledError

OPERATIONS_DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by name and sorted labels."""
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def family_names(metrics: Metrics) -> set[str]:
    text = generate_latest(metrics.registry).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def test_metrics_each_instance_has_its_own_registry() -> None:
    """Two Metrics count apart, and neither registers in the global registry."""
    first, second = Metrics(), Metrics()

    first.record_consumed("persons")
    first.record_consumed("persons")
    second.record_consumed("persons")

    assert value(first, "cio_worker_records_consumed_total", topic="persons") == 2
    assert value(second, "cio_worker_records_consumed_total", topic="persons") == 1
    assert REGISTRY.get_sample_value("cio_worker_records_consumed_total") is None


def test_metrics_record_counts_are_exported_by_topic_stage_and_reason() -> None:
    """Consumed, delivered, skipped, batches and dead letters carry their labels."""
    metrics = Metrics()

    for _ in range(5):
        metrics.record_consumed("persons")
    metrics.record_consumed("person-events")
    metrics.record_batch("persons", delivered=3, skipped=1)
    metrics.record_batch("persons", delivered=0, skipped=0)
    metrics.record_dead_lettered("persons", "api", "too_long")
    metrics.record_transaction()
    metrics.record_transaction(0)

    assert value(metrics, "cio_worker_records_consumed_total", topic="persons") == 5
    assert (
        value(metrics, "cio_worker_records_consumed_total", topic="person-events") == 1
    )
    assert value(metrics, "cio_worker_records_delivered_total", topic="persons") == 3
    assert value(metrics, "cio_worker_records_skipped_total", topic="persons") == 1
    assert value(metrics, "cio_worker_batches_total", topic="persons") == 2
    assert (
        value(
            metrics,
            "cio_worker_records_dead_lettered_total",
            topic="persons",
            stage="api",
            reason="too_long",
        )
        == 1
    )
    assert value(metrics, "cio_worker_transactions_total") == 1


def test_metrics_observe_request_fills_status_latency_entries_and_bytes() -> None:
    """An answered request counts its status and lands in the three histograms."""
    metrics = Metrics()

    metrics.observe_request(200, 0.08, 500, 120_000)
    metrics.observe_request(207, 0.3, 1, 900)

    assert value(metrics, "cio_worker_track_responses_total", status="200") == 1
    assert value(metrics, "cio_worker_track_responses_total", status="207") == 1
    assert value(metrics, "cio_worker_track_request_duration_seconds_count") == 2
    assert value(
        metrics, "cio_worker_track_request_duration_seconds_bucket", le="0.1"
    ) == (1)
    assert value(metrics, "cio_worker_request_entries_sum") == 501
    assert value(metrics, "cio_worker_request_body_bytes_bucket", le="1000.0") == 1


@pytest.mark.parametrize(
    ("error", "reason", "status"),
    [
        (CredentialsError("refused"), "credentials", None),
        (ThrottledError(429, 2.0), "throttled", "429"),
        (ThrottledError(503, None), "server_error", "503"),
        (TransientError("Track API unreachable: ConnectTimeout"), "unreachable", None),
    ],
)
def test_metrics_record_retry_counts_reason_wait_and_known_status(
    error: Exception, reason: str, status: str | None
) -> None:
    """A retried failure counts by reason, adds its wait, and its status if any."""
    metrics = Metrics()

    metrics.record_retry(error, 1.5)
    metrics.record_retry(error, 0.5)

    assert retry_reason(error) == reason
    assert value(metrics, "cio_worker_retries_total", reason=reason) == 2
    assert value(metrics, "cio_worker_retry_wait_seconds_total", reason=reason) == 2.0
    responses = {
        dict(labels)["status"]: v
        for (name, labels), v in samples(metrics).items()
        if name == "cio_worker_track_responses_total"
    }
    assert responses == ({status: 2} if status else {})


def test_metrics_rate_limit_waits_count_and_seconds() -> None:
    """Waits for the worker's own rate limit are counted apart from retries."""
    metrics = Metrics()

    metrics.record_rate_limit_wait(0.25)
    metrics.record_rate_limit_wait(0.5)

    assert value(metrics, "cio_worker_rate_limit_waits_total") == 2
    assert value(metrics, "cio_worker_rate_limit_wait_seconds_total") == 0.75


def test_metrics_set_lags_replaces_and_forget_drops_series() -> None:
    """set_lags keeps only the partitions given; forget_partitions drops others."""
    metrics = Metrics()

    metrics.set_lags({("persons", 0): 10, ("persons", 1): 0})
    metrics.set_lag("person-events", 2, 7)
    metrics.forget_partitions([("persons", 1)])
    lags = {
        dict(labels)["partition"]: v
        for (name, labels), v in samples(metrics).items()
        if name == "cio_worker_consumer_lag"
    }

    assert lags == {"0": 10, "2": 7}
    metrics.set_lags({})
    assert not any(name == "cio_worker_consumer_lag" for name, _ in samples(metrics))


def test_metrics_restore_lifecycle_reports_progress_keys_and_seconds() -> None:
    """restoring is 1 during a restore, records and seconds grow, keys at the end."""
    clock = FakeClock()
    metrics = Metrics(clock=clock)

    metrics.restore_started(partitions=2)
    clock.now += 4
    metrics.restore_progress(10_000, 2)
    metrics.restore_progress(25_000, 1)
    during = samples(metrics)
    restoring_verdict = metrics.health.readiness()
    clock.now += 1
    metrics.restore_finished(keys=9_000)
    after = samples(metrics)

    assert during[("cio_worker_state_restoring", ())] == 1
    assert during[("cio_worker_state_restored_records_total", ())] == 25_000
    assert during[("cio_worker_state_restore_seconds", ())] == 4
    assert restoring_verdict.body["restoring"] is True
    assert after[("cio_worker_state_restoring", ())] == 0
    assert after[("cio_worker_state_restore_seconds", ())] == 5
    assert after[("cio_worker_state_restored_keys", ())] == 9_000
    assert after[("cio_worker_state_restores_total", ())] == 1


def test_metrics_restore_progress_counts_each_restore_from_zero() -> None:
    """Progress is cumulative within one restore; a second restore adds to it."""
    metrics = Metrics()

    metrics.restore_started(1)
    metrics.restore_progress(100, 0)
    metrics.restore_finished(keys=50)
    metrics.restore_started(1)
    metrics.restore_progress(30, 0)
    metrics.restore_finished(keys=20)

    assert value(metrics, "cio_worker_state_restored_records_total") == 130


def test_metrics_restore_progress_is_a_heartbeat() -> None:
    """A long restore blocks the loop, but its progress keeps /healthz alive."""
    clock = FakeClock()
    metrics = Metrics(clock=clock)
    metrics.restore_started(1)

    clock.now += 500
    metrics.restore_progress(1, 1)

    assert metrics.health.liveness(timeout_s=120).ready


def test_metrics_health_facts_are_exported() -> None:
    """Assigned partitions, credentials pause, readiness and heartbeat age."""
    clock = FakeClock()
    metrics = Metrics(clock=clock)

    metrics.set_assigned(6)
    metrics.set_credentials_paused(True)
    metrics.set_buffered_bytes(4096)
    clock.now += 3
    scrape = samples(metrics)

    assert scrape[("cio_worker_assigned_partitions", ())] == 6
    assert scrape[("cio_worker_credentials_paused", ())] == 1
    assert scrape[("cio_worker_ready", ())] == 0
    assert scrape[("cio_worker_heartbeat_age_seconds", ())] == 3
    assert scrape[("cio_worker_buffered_bytes", ())] == 4096
    metrics.set_credentials_paused(False)
    metrics.heartbeat()
    assert value(metrics, "cio_worker_ready") == 1
    assert value(metrics, "cio_worker_heartbeat_age_seconds") == 0


def test_metrics_info_names_the_version() -> None:
    """cio_worker_info carries the running version as a label."""
    from worker import __version__

    assert value(Metrics(), "cio_worker_info", version=__version__) == 1


@pytest.mark.parametrize(
    ("high", "next_offset", "expected"),
    [(100, 40, 60), (100, 100, 0), (100, 120, 0), (-1001, 5, None), (5, -1001, None)],
)
def test_lag_of_counts_records_to_the_end_or_none_when_unknown(
    high: int, next_offset: int, expected: int | None
) -> None:
    """Lag is the high watermark minus the next offset, never negative."""
    assert lag_of(high, next_offset) == expected


@dataclass
class FakeTopicPartition:
    topic: str
    partition: int
    offset: int = -1001


@dataclass
class FakeConsumer:
    """position() and cached watermarks, as confluent_kafka.Consumer has them."""

    positions: dict[tuple[str, int], int]
    highs: dict[tuple[str, int], int]
    calls: list[bool] = field(default_factory=list)

    def position(self, partitions: list[object]) -> list[FakeTopicPartition]:
        result = []
        for tp in partitions:
            key = (tp.topic, tp.partition)  # type: ignore[attr-defined]
            result.append(FakeTopicPartition(*key, self.positions.get(key, -1001)))
        return result

    def get_watermark_offsets(
        self, tp: FakeTopicPartition, cached: bool = False
    ) -> tuple[int, int]:
        self.calls.append(cached)
        return 0, self.highs.get((tp.topic, tp.partition), -1001)


def test_consumer_lags_uses_cached_watermarks_and_end_of_partition() -> None:
    """Lag per partition from the position, or the EOF offset when further; no
    broker round trip (cached watermarks); unknown partitions are left out."""
    consumer = FakeConsumer(
        positions={("p", 0): 40, ("p", 1): 7, ("p", 2): -1001},
        highs={("p", 0): 100, ("p", 1): 9, ("p", 2): -1001},
    )

    lags = consumer_lags(consumer, [("p", 0), ("p", 1), ("p", 2)], {("p", 1): 9})

    assert lags == {("p", 0): 60, ("p", 1): 0}
    assert consumer.calls
    assert all(consumer.calls)


def test_metrics_record_consumed_is_cheap_enough_for_the_hot_path() -> None:
    """200,000 per-record calls (4 s of input at 50k records/s) take well under
    a second: the hot path pays no lock and no label lookup."""
    metrics = Metrics()
    record = metrics.record_consumed

    started = time.perf_counter()
    for _ in range(200_000):
        record("persons")
    elapsed = time.perf_counter() - started

    assert elapsed < 1.0
    assert value(metrics, "cio_worker_records_consumed_total", topic="persons") == (
        200_000
    )


def test_metrics_scrape_while_the_loop_counts_never_fails() -> None:
    """Scrapes during counting (new topics and reasons appearing) stay whole."""
    metrics = Metrics()
    stop = threading.Event()

    def count() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            metrics.record_consumed(f"topic-{n % 500}")
            metrics.record_dead_lettered(f"topic-{n % 50}", "api", f"r{n % 300}")
            metrics.set_lag(f"topic-{n % 40}", n % 12, n)

    loop = threading.Thread(target=count)
    loop.start()
    try:
        for _ in range(50):
            generate_latest(metrics.registry)
    finally:
        stop.set()
        loop.join()


def test_metrics_retries_from_many_threads_add_up() -> None:
    """The sender-thread calls are thread-safe."""
    metrics = Metrics()

    def retry() -> None:
        for _ in range(1000):
            metrics.record_retry(ThrottledError(429, None), 0.001)

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert value(metrics, "cio_worker_retries_total", reason="throttled") == 8000


def test_every_exported_metric_is_documented_in_operations_md() -> None:
    """docs/operations.md lists each metric family the worker exports."""
    metrics = Metrics()
    metrics.observe_request(200, 0.1, 1, 100)
    metrics.record_retry(ThrottledError(429, None), 1)
    metrics.record_rate_limit_wait(1)
    documented = set(re.findall(r"`(cio_worker_[a-z_]+)`", OPERATIONS_DOC.read_text()))

    exported = family_names(metrics)

    missing = sorted(
        name
        for name in exported
        if not name.endswith("_created")
        and name not in documented
        and f"{name}_total" not in documented
    )
    assert not missing, f"metrics missing from docs/operations.md: {missing}"
