"""The consumer group loop: poll, batch, send, settle, commit, shut down.

One thread owns the consumer and the dead-letter producer. Batches are sent
from a small thread pool; their outcomes come back to the owning thread, which
alone writes dead letters and commits. At most one batch per partition is in
flight, so records of one partition reach the API in offset order.

Offsets move only after delivery: a batch is *settled* when the API accepted
its entries and every rejected record of it is confirmed on the dead-letter
topic; only then is the offset after its last record committed.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from worker.avro import AvroDecoder, load_schema
from worker.batcher import Batch, BatchLimits, PartitionBuffer
from worker.delivery import AbandonedError, Deliverer, Outcome
from worker.errors import ConfigError, TransientError, WorkerError
from worker.pipeline import Kind, TopicRoute, to_item
from worker.rejects import Reject, reject_headers
from worker.settings import Settings, kafka_client_config
from worker.track import TrackClient

log = structlog.get_logger(__name__)

POLL_TIMEOUT_S = 0.05
# Messages taken from librdkafka per call: large enough to amortise the call,
# small enough that lingering batches are looked at every few milliseconds.
CONSUME_BATCH = 1000
DEAD_LETTER_FLUSH_TIMEOUT_S = 30.0
SHUTDOWN_DEADLINE_S = 30.0
METADATA_TIMEOUT_S = 10.0

TP = tuple[str, int]


@dataclass(slots=True)
class Counters:
    consumed: int = 0
    delivered: int = 0
    rejected: int = 0
    batches: int = 0
    requests: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "delivered": self.delivered,
            "rejected": self.rejected,
            "batches": self.batches,
            "requests": self.requests,
            "rejected_by_reason": dict(self.by_reason),
        }


class Worker:
    """Delivers the person and event topics to the Track API until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        until_caught_up: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        site_id, api_key = settings.require_credentials()
        self.settings = settings
        self.until_caught_up = until_caught_up
        self.counters = Counters()
        self._clock = clock
        self._stop_requested = threading.Event()
        self._abandon = threading.Event()
        self._routes = {
            settings.kafka.person_topic: TopicRoute(
                Kind.PERSON, AvroDecoder(load_schema(settings.schemas.person))
            ),
            settings.kafka.event_topic: TopicRoute(
                Kind.EVENT, AvroDecoder(load_schema(settings.schemas.event))
            ),
        }
        self._limits = BatchLimits(
            settings.batch.max_entries,
            settings.batch.max_request_bytes,
            settings.batch.linger_ms / 1000,
        )
        track = settings.track
        self._client = TrackClient(
            track.url,
            site_id,
            api_key,
            connect_timeout_s=track.connect_timeout_s,
            read_timeout_s=track.read_timeout_s,
            pool_size=track.max_concurrency,
        )
        self._deliverer = Deliverer(
            self._client, self._abandon, max_wait_s=track.retry_max_wait_s
        )
        self._pool = ThreadPoolExecutor(
            track.max_concurrency, thread_name_prefix="cio-send"
        )
        self._buffers: dict[TP, PartitionBuffer] = {}
        self._in_flight: dict[Future[Outcome], Batch] = {}
        self._paused: set[TP] = set()
        self._revoking: set[TP] = set()
        self._eof: dict[TP, int] = {}
        self._end_at_start: dict[TP, int] = {}
        self._dead_letter_errors: list[str] = []
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None

    # -- lifecycle -------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to stop; safe from a signal handler."""
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> Counters:
        """Run until stopped (or caught up); return what was done."""
        started = self._clock()
        self._connect()
        assert self._consumer is not None
        log.info(
            "worker_started",
            until_caught_up=self.until_caught_up,
            settings=self.settings.redacted(),
        )
        try:
            while not self._stop_requested.is_set():
                self._run_once()
                if self.until_caught_up and self._caught_up():
                    log.info("caught_up")
                    break
        finally:
            self._shutdown()
        log.info(
            "worker_stopped",
            seconds=round(self._clock() - started, 3),
            **self.counters.as_dict(),
        )
        return self.counters

    def _connect(self) -> None:
        kafka = self.settings.kafka
        self._producer = Producer(kafka_client_config(self.settings, "producer"))
        consumer = Consumer(kafka_client_config(self.settings, "consumer"))
        self._check_topics(consumer)
        consumer.subscribe(
            [kafka.person_topic, kafka.event_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._consumer = consumer

    def _check_topics(self, consumer: Consumer) -> None:
        kafka = self.settings.kafka
        try:
            metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            consumer.close()
            raise ConfigError(
                f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc.args[0]}; "
                "check CIO_KAFKA__BOOTSTRAP_SERVERS and the security properties"
            ) from exc
        wanted = [kafka.person_topic, kafka.event_topic, kafka.dead_letter_topic]
        missing = [t for t in wanted if t not in metadata.topics]
        if missing:
            consumer.close()
            raise ConfigError(
                f"topics missing on {kafka.bootstrap_servers}: {', '.join(missing)}; "
                "create them or set CIO_KAFKA__PERSON_TOPIC / EVENT_TOPIC / "
                "DEAD_LETTER_TOPIC"
            )

    def _shutdown(self) -> None:
        """Settle what is in flight within the deadline, commit it, close."""
        log.info("worker_stopping", in_flight=len(self._in_flight))
        deadline = self._clock() + SHUTDOWN_DEADLINE_S
        while self._in_flight and self._clock() < deadline:
            self._settle_done(wait_s=0.1)
        if self._in_flight:
            log.warning("batches_abandoned", count=len(self._in_flight))
        self._abandon.set()
        self._settle_done(wait_s=0)
        if self.until_caught_up:
            self._commit_idle_positions()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._consumer is not None:
            self._consumer.close()
        if self._producer is not None:
            self._producer.flush(DEAD_LETTER_FLUSH_TIMEOUT_S)
        self._client.close()

    # -- one turn of the loop ----------------------------------------------------

    def _run_once(self) -> None:
        assert self._consumer is not None
        messages = self._consumer.consume(CONSUME_BATCH, timeout=POLL_TIMEOUT_S)
        now = self._clock()
        for message in messages:
            self._handle(message, now)
        self._settle_done(wait_s=0)
        self._launch_ready(self._clock())
        self._apply_backpressure()

    def _handle(self, message: Any, now: float) -> None:
        error = message.error()
        tp = (message.topic(), message.partition())
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._eof[tp] = message.offset()
                return
            if error.fatal():
                raise WorkerError(f"fatal Kafka error: {error.str()}")
            log.warning("kafka_error", code=error.name(), error=error.str())
            return
        buffer = self._buffers.get(tp)
        if buffer is None:  # a message for a partition revoked meanwhile
            return
        self._eof.pop(tp, None)
        self.counters.consumed += 1
        buffer.add(to_item(message, self._routes[message.topic()]), now)

    def _launch_ready(self, now: float) -> None:
        if self._stop_requested.is_set():
            return  # shutting down: settle what is in flight, start nothing new
        for tp, buffer in self._buffers.items():
            if tp in self._revoking:
                continue
            at_end = tp in self._eof and self.until_caught_up
            buffer.seal_if_due(now, force=at_end)
            batch = buffer.take_next()
            if batch is not None:
                self._launch(batch)

    def _launch(self, batch: Batch) -> None:
        entries = batch.entries()
        future: Future[Outcome] = Future()
        if entries:
            future = self._pool.submit(
                self._deliverer.deliver,
                entries,
                topic=batch.topic,
                partition=batch.partition,
                first_offset=batch.first_offset,
            )
        else:
            future.set_result(Outcome())
        self._in_flight[future] = batch

    # -- settling: dead letters, then commit -------------------------------------

    def _settle_done(self, wait_s: float) -> None:
        if wait_s and self._in_flight:
            wait(list(self._in_flight), timeout=wait_s, return_when=FIRST_COMPLETED)
        settled: list[tuple[Batch, Outcome]] = []
        for future in [f for f in self._in_flight if f.done()]:
            batch = self._in_flight.pop(future)
            try:
                outcome = future.result()
            except AbandonedError:
                continue  # not settled: re-sent after restart, never committed
            if (batch.topic, batch.partition) not in self._buffers:
                continue  # revoked meanwhile: the new owner re-sends it
            settled.append((batch, outcome))
        if settled:
            self._write_dead_letters(settled)
            self._commit(settled)

    def _write_dead_letters(self, settled: list[tuple[Batch, Outcome]]) -> None:
        assert self._producer is not None
        topic = self.settings.kafka.dead_letter_topic
        count = 0
        for batch, outcome in settled:
            for item, reject in _rejects_of(batch, outcome):
                message = item.message
                self._producer.produce(
                    topic,
                    key=message.key(),
                    value=message.value(),
                    headers=reject_headers(message, reject),
                    on_delivery=self._on_dead_letter_delivery,
                )
                count += 1
                self.counters.by_reason[reject.reason] = (
                    self.counters.by_reason.get(reject.reason, 0) + 1
                )
                log.error(
                    "record_dead_lettered",
                    topic=batch.topic,
                    partition=batch.partition,
                    offset=item.offset,
                    stage=reject.stage,
                    reason=reject.reason,
                    field=reject.field,
                )
        if count:
            self._flush_dead_letters()
        self.counters.rejected += count

    def _flush_dead_letters(self) -> None:
        assert self._producer is not None
        remaining = self._producer.flush(DEAD_LETTER_FLUSH_TIMEOUT_S)
        while remaining and not self._stop_requested.is_set():
            log.warning("dead_letter_flush_slow", remaining=remaining)
            remaining = self._producer.flush(DEAD_LETTER_FLUSH_TIMEOUT_S)
        if remaining or self._dead_letter_errors:
            errors = "; ".join(self._dead_letter_errors[:3])
            raise TransientError(
                f"dead letters not confirmed ({remaining} pending; {errors}); "
                "offsets not committed"
            )

    def _on_dead_letter_delivery(self, error: KafkaError | None, _: Any) -> None:
        if error is not None:
            self._dead_letter_errors.append(error.str())

    def _commit(self, settled: list[tuple[Batch, Outcome]]) -> None:
        assert self._consumer is not None
        offsets: dict[TP, int] = {}
        for batch, outcome in settled:
            tp = (batch.topic, batch.partition)
            buffer = self._buffers.get(tp)
            if buffer is not None:
                buffer.complete(batch)
            offsets[tp] = max(offsets.get(tp, 0), batch.last_offset + 1)
            self._count_and_log(batch, outcome)
        self._commit_offsets(offsets)
        self._launch_ready(self._clock())

    def _commit_offsets(self, offsets: dict[TP, int]) -> None:
        assert self._consumer is not None
        if not offsets:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        except KafkaException as exc:
            # The batch is delivered; a failed commit only means it may be sent
            # again after a restart, which event ids make harmless.
            log.warning("commit_failed", error=str(exc.args[0]))

    def _count_and_log(self, batch: Batch, outcome: Outcome) -> None:
        entries = batch.entry_count
        api_rejected = len(outcome.rejected)
        self.counters.delivered += entries - api_rejected
        self.counters.batches += 1
        self.counters.requests += outcome.requests
        if entries:
            log.info(
                "batch_sent",
                topic=batch.topic,
                partition=batch.partition,
                first_offset=batch.first_offset,
                last_offset=batch.last_offset,
                entries=entries,
                bytes=batch.body_bytes,
                status=outcome.last_status,
                requests=outcome.requests,
                attempts=outcome.attempts,
                refused=api_rejected,
                latency_ms=round(outcome.latency_s * 1000, 1),
            )

    def _commit_idle_positions(self) -> None:
        """Commit the end offset of every drained partition (run-until-caught-up)."""
        offsets = {
            tp: self._eof[tp]
            for tp, buffer in self._buffers.items()
            if tp in self._eof and buffer.is_idle()
        }
        self._commit_offsets(offsets)

    # -- flow control and rebalances ---------------------------------------------

    def _apply_backpressure(self) -> None:
        assert self._consumer is not None
        cap = self.settings.batch.max_buffered_bytes_per_partition
        for tp, buffer in self._buffers.items():
            if tp not in self._paused and buffer.buffered_bytes > cap:
                self._consumer.pause([TopicPartition(*tp)])
                self._paused.add(tp)
            elif tp in self._paused and buffer.buffered_bytes <= cap // 2:
                self._consumer.resume([TopicPartition(*tp)])
                self._paused.discard(tp)

    def _caught_up(self) -> bool:
        if not self._buffers or self._in_flight:
            return False
        return all(
            buffer.is_idle() and self._eof.get(tp, -1) >= self._end_at_start.get(tp, 0)
            for tp, buffer in self._buffers.items()
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._buffers[key] = PartitionBuffer(tp.topic, tp.partition, self._limits)
            if self.until_caught_up:
                _, high = consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
                self._end_at_start[key] = high
        log.info("partitions_assigned", partitions=_names(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Settle the revoked partitions' in-flight batches, commit, forget them."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._revoking |= revoked
        deadline = self._clock() + SHUTDOWN_DEADLINE_S
        while self._clock() < deadline and any(
            (b.topic, b.partition) in revoked for b in self._in_flight.values()
        ):
            self._settle_done(wait_s=0.05)
        self._forget(revoked)
        self._revoking -= revoked
        log.info("partitions_revoked", partitions=_names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop lost partitions without committing: another member owns them."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        for future, batch in list(self._in_flight.items()):
            if (batch.topic, batch.partition) in lost:
                del self._in_flight[future]
        self._forget(lost)
        log.warning("partitions_lost", partitions=_names(partitions))

    def _forget(self, partitions: set[TP]) -> None:
        for tp in partitions:
            self._buffers.pop(tp, None)
            self._paused.discard(tp)
            self._eof.pop(tp, None)
            self._end_at_start.pop(tp, None)


def _rejects_of(batch: Batch, outcome: Outcome) -> list[tuple[Any, Reject]]:
    """Every rejected item of a batch, in offset order, with its reason."""
    api_rejected = {
        id(item): outcome.rejected[index]
        for index, item in enumerate(batch.entry_items())
        if index in outcome.rejected
    }
    rejects = []
    for item in batch.items:
        if item.reject is not None:
            rejects.append((item, item.reject))
        elif id(item) in api_rejected:
            refusal = api_rejected[id(item)]
            rejects.append(
                (item, Reject("api", refusal.reason, refusal.message, refusal.field))
            )
    return rejects


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
