"""The worker's Prometheus metrics: one object the loop and the senders call.

``Metrics`` owns its own ``CollectorRegistry`` (never the global one), so a
process, or a test, can hold several. Its methods are split by who calls them
and how often:

- **The loop thread, per record or per batch** (records consumed, delivered,
  skipped, dead-lettered; batches): plain integers in dicts, bumped without a
  lock and read by a collector only when Prometheus scrapes. A labelled
  prometheus_client counter costs about 2.4 µs a call (a lock and a label
  lookup), an eighth of a core at 50,000 records/s; a dict increment costs
  about 0.1 µs. These methods must only be called from the loop's thread.
- **The sender threads, per HTTP request** (requests, retries, rate-limit
  waits): prometheus_client's own metrics, which are thread-safe; a request
  carries up to 1,000 entries, so their cost does not matter.
- **Gauges the loop samples** (lag, buffered bytes, credentials paused) and
  lifecycle events (rebalances, state restores, commits, heartbeats).

Readiness and liveness facts are forwarded to a ``HealthState``
(``worker.health``), which the HTTP server reads; the loop talks to this
object alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import __version__
from worker.errors import CredentialsError
from worker.health import HealthState

TP = tuple[str, int]

# Track API round trips: tens of milliseconds when healthy, up to the 30 s read
# timeout when not.
LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Entries per request: 1 (a bisected culprit) up to max_entries (at most 10,000).
ENTRIES_BUCKETS = (1, 10, 50, 100, 250, 500, 750, 1000, 2500, 10_000)
# Request bodies stay under 500,000 bytes (Customer.io's 500 KB).
BODY_BYTES_BUCKETS = (1e3, 1e4, 5e4, 1e5, 2e5, 3e5, 4e5, 5e5)


class Metrics:
    """Counters, histograms and gauges of one worker, in their own registry."""

    def __init__(
        self,
        health: HealthState | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.health = health if health is not None else HealthState(clock=clock)
        self._clock = clock
        # Owned by the loop thread; read by _LoopCollector at scrape time.
        self.consumed: dict[str, int] = {}
        self.delivered: dict[str, int] = {}
        self.skipped: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.dead_lettered: dict[tuple[str, str, str], int] = {}
        self.lags: dict[TP, int] = {}
        self.buffered_bytes = 0
        self.rate_limit_rps = 0.0
        self.transactions = 0
        self.restored_records = 0
        self.restores = 0
        self.restored_keys = 0
        self.restore_seconds = 0.0
        self.restore_started_at: float | None = None
        self._restore_loaded = 0
        self._register_request_metrics()
        self.registry.register(_LoopCollector(self))

    def _register_request_metrics(self) -> None:
        registry = self.registry
        self._responses = Counter(
            "cio_worker_track_responses",
            "Track API answers to batch requests, by HTTP status.",
            ["status"],
            registry=registry,
        )
        self._latency = Histogram(
            "cio_worker_track_request_duration_seconds",
            "Track API batch request round trips that got an answer.",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._entries = Histogram(
            "cio_worker_request_entries",
            "Entries per Track API batch request.",
            buckets=ENTRIES_BUCKETS,
            registry=registry,
        )
        self._body_bytes = Histogram(
            "cio_worker_request_body_bytes",
            "Body bytes per Track API batch request.",
            buckets=BODY_BYTES_BUCKETS,
            registry=registry,
        )
        self._retries = Counter(
            "cio_worker_retries",
            "Batch requests retried, by reason.",
            ["reason"],
            registry=registry,
        )
        self._retry_wait = Counter(
            "cio_worker_retry_wait_seconds",
            "Seconds waited before retries, by reason.",
            ["reason"],
            registry=registry,
        )
        self._rate_limit_waits = Counter(
            "cio_worker_rate_limit_waits",
            "Requests held back by the worker's own rate limit.",
            registry=registry,
        )
        self._rate_limit_wait = Counter(
            "cio_worker_rate_limit_wait_seconds",
            "Seconds requests waited for the worker's own rate limit.",
            registry=registry,
        )
        self._info = Gauge(
            "cio_worker_info",
            "Always 1; the worker's version as a label.",
            ["version"],
            registry=registry,
        )
        self._info.labels(__version__).set(1)

    # -- the loop thread: per record --------------------------------------------

    def record_consumed(self, topic: str) -> None:
        """One record taken from ``topic`` (per record; loop thread only)."""
        self.consumed[topic] = self.consumed.get(topic, 0) + 1

    def record_dead_lettered(self, topic: str, stage: str, reason: str) -> None:
        """One record written to the dead-letter topic (loop thread only)."""
        key = (topic, stage, reason)
        self.dead_lettered[key] = self.dead_lettered.get(key, 0) + 1

    # -- the loop thread: per batch ----------------------------------------------

    def record_batch(self, topic: str, delivered: int, skipped: int) -> None:
        """One settled batch: its entries the API accepted, its skipped records."""
        self.batches[topic] = self.batches.get(topic, 0) + 1
        if delivered:
            self.delivered[topic] = self.delivered.get(topic, 0) + delivered
        if skipped:
            self.skipped[topic] = self.skipped.get(topic, 0) + skipped

    def record_transaction(self, count: int = 1) -> None:
        """Transactions committed (dead letters, state and offsets together)."""
        self.transactions += count

    # -- the loop thread: sampled gauges and lifecycle ----------------------------

    def heartbeat(self) -> None:
        """The loop turned; call once per turn (keeps /healthz at 200)."""
        self.health.heartbeat()

    def set_lags(self, lags: Mapping[TP, int]) -> None:
        """Replace every partition's lag; partitions left out lose their series."""
        self.lags = dict(lags)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Set one partition's lag."""
        self.lags[(topic, partition)] = lag

    def forget_partitions(self, partitions: Iterable[TP]) -> None:
        """Drop the lag of revoked or lost partitions: another member reports it."""
        for tp in partitions:
            self.lags.pop(tp, None)

    def set_buffered_bytes(self, count: int) -> None:
        """Bytes read and not yet settled, over all partitions."""
        self.buffered_bytes = count

    def set_rate_limit(self, requests_per_s: float) -> None:
        """The request rate this process may send now (lowered after 429s)."""
        self.rate_limit_rps = requests_per_s

    def set_assigned(self, count: int) -> None:
        """Input partitions this worker owns now (after every rebalance)."""
        self.health.set_assigned(count)

    def set_credentials_paused(self, paused: bool) -> None:
        """Whether delivery is paused because the API refuses the credentials."""
        self.health.set_credentials_paused(paused)

    def restore_started(self, partitions: int) -> None:
        """A state restore of ``partitions`` state partitions begins."""
        self.restore_started_at = self._clock()
        self._restore_loaded = 0
        self.health.set_restoring(True)

    def restore_progress(self, loaded: int, pending: int) -> None:
        """Records loaded so far by the running restore (``restore``'s callback).

        Also a heartbeat: a long restore blocks the loop, yet it is alive.
        """
        self.restored_records += max(0, loaded - self._restore_loaded)
        self._restore_loaded = loaded
        self.health.heartbeat()

    def restore_finished(self, keys: int) -> None:
        """The running restore ended; ``keys``: keys the state holds now."""
        if self.restore_started_at is not None:
            self.restore_seconds = self._clock() - self.restore_started_at
        self.restore_started_at = None
        self.restores += 1
        self.restored_keys = keys
        self.health.set_restoring(False)
        self.health.heartbeat()

    # -- the sender threads: per request ------------------------------------------

    def observe_request(
        self, status: int, latency_s: float, entries: int, body_bytes: int
    ) -> None:
        """One answered batch request (thread-safe)."""
        self._responses.labels(str(status)).inc()
        self._latency.observe(latency_s)
        self._entries.observe(entries)
        self._body_bytes.observe(body_bytes)

    def record_retry(self, error: BaseException, wait_s: float) -> None:
        """One failed attempt about to be retried after ``wait_s`` (thread-safe).

        A failure that carries an HTTP status (``error.status``) also counts as
        an answer of that status.
        """
        reason = retry_reason(error)
        status = getattr(error, "status", None)
        if isinstance(status, int):
            self._responses.labels(str(status)).inc()
        self._retries.labels(reason).inc()
        self._retry_wait.labels(reason).inc(max(0.0, wait_s))

    def record_rate_limit_wait(self, wait_s: float) -> None:
        """One request held back ``wait_s`` by the worker's own rate limit."""
        self._rate_limit_waits.inc()
        self._rate_limit_wait.inc(max(0.0, wait_s))


def retry_reason(error: BaseException) -> str:
    """The ``reason`` label of a retried failure.

    ``credentials`` (401/403: delivery paused), ``throttled`` (429),
    ``server_error`` (5xx, 408 and other retryable statuses) or ``unreachable``
    (connection errors and timeouts: no answer at all).
    """
    if isinstance(error, CredentialsError):
        return "credentials"
    status = getattr(error, "status", None)
    if status == 429:
        return "throttled"
    if isinstance(status, int):
        return "server_error"
    return "unreachable"


def lag_of(high: int, next_offset: int) -> int | None:
    """Records between the next offset to read and the high watermark.

    None when either is unknown (librdkafka reports unknown offsets as negative
    numbers, e.g. before the first fetch of a partition).
    """
    if high < 0 or next_offset < 0:
        return None
    return max(0, high - next_offset)


def consumer_lags(
    consumer: Any, partitions: Iterable[TP], eof: Mapping[TP, int]
) -> dict[TP, int]:
    """Lag of each partition from librdkafka's cached watermarks (no broker call).

    The next offset is the consumer's position, or the end-of-partition offset
    when that is further (an end reached through transaction markers).
    """
    from confluent_kafka import TopicPartition  # the loop already loaded it

    lags = {}
    positions = consumer.position([TopicPartition(t, p) for t, p in partitions])
    for position in positions:
        tp = (position.topic, position.partition)
        _, high = consumer.get_watermark_offsets(position, cached=True)
        lag = lag_of(high, max(position.offset, eof.get(tp, -1)))
        if lag is not None:
            lags[tp] = lag
    return lags


class _LoopCollector(Collector):
    """Exports the loop thread's plain counters and the health facts on scrape.

    ``dict(d)`` copies a dict of str or tuple keys and int values in one step
    under the GIL, so a scrape never sees a dict change size mid-copy.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield from _by_topic(
            ("cio_worker_records_consumed", "Records read from the input topics.",
             m.consumed),
            ("cio_worker_records_delivered", "Records the Track API accepted.",
             m.delivered),
            ("cio_worker_records_skipped",
             "Records not sent: duplicates by the state, or ignored tombstones.",
             m.skipped),
            ("cio_worker_batches", "Batches settled and committed.", m.batches),
        )  # fmt: skip
        dead = CounterMetricFamily(
            "cio_worker_records_dead_lettered",
            "Records written to the dead-letter topic, by source topic, stage and "
            "reason.",
            labels=["topic", "stage", "reason"],
        )
        for (topic, stage, reason), value in dict(m.dead_lettered).items():
            dead.add_metric([topic, stage, reason], value)
        yield dead
        lag = GaugeMetricFamily(
            "cio_worker_consumer_lag",
            "Records between the worker's position and the end of each partition it "
            "owns.",
            labels=["topic", "partition"],
        )
        for (topic, partition), value in dict(m.lags).items():
            lag.add_metric([topic, str(partition)], value)
        yield lag
        yield from self._scalars(m)

    def _scalars(self, m: Metrics) -> Iterator[Metric]:
        health = m.health
        now = m._clock()
        running = m.restore_started_at
        yield GaugeMetricFamily(
            "cio_worker_buffered_bytes",
            "Bytes read from Kafka and not yet settled, over all partitions.",
            value=m.buffered_bytes,
        )
        yield GaugeMetricFamily(
            "cio_worker_rate_limit_requests_per_second",
            "Requests per second this process may send now; below its share of "
            "[track] rate_limit_rps after 429s.",
            value=m.rate_limit_rps,
        )
        yield CounterMetricFamily(
            "cio_worker_transactions",
            "Kafka transactions committed (dead letters, state and offsets).",
            value=m.transactions,
        )
        yield GaugeMetricFamily(
            "cio_worker_assigned_partitions",
            "Input partitions this worker owns.",
            value=health.assigned,
        )
        yield GaugeMetricFamily(
            "cio_worker_credentials_paused",
            "1 while delivery is paused because the Track API refuses the credentials.",
            value=int(health.credentials_paused),
        )
        yield GaugeMetricFamily(
            "cio_worker_ready",
            "1 when /readyz answers 200.",
            value=int(health.readiness().ready),
        )
        yield GaugeMetricFamily(
            "cio_worker_heartbeat_age_seconds",
            "Seconds since the loop last turned.",
            value=max(0.0, now - health.last_heartbeat),
        )
        yield GaugeMetricFamily(
            "cio_worker_state_restoring",
            "1 while state partitions are being restored.",
            value=int(health.restoring),
        )
        yield CounterMetricFamily(
            "cio_worker_state_restores",
            "State restores finished.",
            value=m.restores,
        )
        yield CounterMetricFamily(
            "cio_worker_state_restored_records",
            "State records read by restores.",
            value=m.restored_records,
        )
        yield GaugeMetricFamily(
            "cio_worker_state_restored_keys",
            "Keys in the state this worker holds, as of the last restore.",
            value=m.restored_keys,
        )
        yield GaugeMetricFamily(
            "cio_worker_state_restore_seconds",
            "Duration of the running restore, else of the last one.",
            value=now - running if running is not None else m.restore_seconds,
        )


def _by_topic(*families: tuple[str, str, dict[str, int]]) -> Iterator[Metric]:
    for name, documentation, counts in families:
        family = CounterMetricFamily(name, documentation, labels=["topic"])
        for topic, value in dict(counts).items():
            family.add_metric([topic], value)
        yield family
