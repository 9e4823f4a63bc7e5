"""The archiver: the dead-letter topic to gzip JSON Lines objects in S3.

``cio-worker archive`` (or a thread of ``cio-worker run`` when ``[archive]
enabled``) reads the dead-letter topic in its own consumer group, buffers each
dead-letter partition's records, and on a flush (count, bytes, age, shutdown)
stores the range it cut as objects laid out as ``worker.archive_format``
describes. A partition's offset is committed only after every object of its
range is stored; a failing S3 pauses that partition and retries, never drops.

Why a re-upload overwrites rather than duplicates: before storing a range
``first..last`` the archiver commits ``first`` again with the metadata
``cio.archive.cut=<last>``. A crash after the upload and before the final
commit brings the next owner back to ``first``; it reads the cut from the
metadata and ends its range at exactly ``last``, so it writes the same names
with the same bytes. The flush triggers decide only where a *new* range ends,
never how an interrupted one is redone.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from worker.archive_format import (
    CUT_METADATA,
    ArchiveObject,
    FlushLimits,
    PartitionArchive,
    build_objects,
    flush_due,
    parse_cut,
    plan_cut,
    retry_delay_s,
)
from worker.errors import ConfigError, TransientError, WorkerError
from worker.pipeline import build_routes
from worker.rejects import StoredDeadLetter
from worker.s3 import ObjectStore
from worker.settings import Settings, kafka_client_config

log = structlog.get_logger(__name__)

POLL_TIMEOUT_S = 0.2
CONSUME_BATCH = 500
METADATA_TIMEOUT_S = 10.0
BACKGROUND_STOP_TIMEOUT_S = 60.0


@dataclass(slots=True)
class ArchiveCounters:
    consumed: int = 0
    archived: int = 0
    fragments: int = 0
    objects: int = 0
    ranges: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "consumed": self.consumed,
            "archived": self.archived,
            "fragments": self.fragments,
            "objects": self.objects,
            "ranges": self.ranges,
        }


class Archiver:
    """Archives the dead-letter topic to S3 until stopped (or caught up)."""

    def __init__(
        self,
        settings: Settings,
        *,
        until_caught_up: bool = False,
        store: ObjectStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        archive = settings.archive
        if not archive.bucket:
            raise ConfigError(
                "no archive bucket: set CIO_ARCHIVE__BUCKET (and the credentials, "
                "see docs/rejects.md)"
            )
        self.settings = settings
        self.until_caught_up = until_caught_up
        self.counters = ArchiveCounters()
        self._topic = settings.kafka.dead_letter_topic
        self._store = store or ObjectStore(archive)
        self._clock = clock
        self._limits = FlushLimits(
            archive.max_records, archive.max_bytes, archive.max_age_s
        )
        # The worker's own decoders (plain or registry-framed Avro), so a line's
        # "decoded" is what the worker saw.
        self._routes = build_routes(settings)
        self._partitions: dict[int, PartitionArchive] = {}
        self._stop_requested = threading.Event()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to stop after archiving what it can; signal-safe."""
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> ArchiveCounters:
        """Run until stopped (or caught up); return what was done."""
        started = self._clock()
        consumer = self._connect()
        log.info(
            "archiver_started",
            until_caught_up=self.until_caught_up,
            topic=self._topic,
            group_id=archive_group_id(self.settings),
            destination=self._store.where,
            prefix=self.settings.archive.prefix,
        )
        try:
            while not self._stop_requested.is_set():
                self._run_once(consumer)
                if self.until_caught_up and self._caught_up():
                    log.info("caught_up")
                    break
            log.info("archiver_stopping", buffered=self._buffered())
            self._drain(consumer)
        finally:
            self._closing = True
            consumer.close()
        log.info(
            "archiver_stopped",
            seconds=round(self._clock() - started, 3),
            **self.counters.as_dict(),
        )
        return self.counters

    def _connect(self) -> Consumer:
        consumer = Consumer(archiver_consumer_config(self.settings))
        servers = self.settings.kafka.bootstrap_servers
        try:
            metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            consumer.close()
            raise ConfigError(
                f"cannot reach Kafka at {servers}: {exc.args[0]}; check "
                "CIO_KAFKA__BOOTSTRAP_SERVERS and the security properties"
            ) from exc
        if self._topic not in metadata.topics:
            consumer.close()
            raise ConfigError(
                f"dead-letter topic {self._topic} missing on {servers}; create it or "
                "set CIO_KAFKA__DEAD_LETTER_TOPIC"
            )
        consumer.subscribe(
            [self._topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        return consumer

    # -- one turn of the loop ------------------------------------------------------

    def _run_once(self, consumer: Consumer) -> None:
        messages = consumer.consume(CONSUME_BATCH, timeout=POLL_TIMEOUT_S)
        now = self._clock()
        for message in messages:
            self._handle(message, now)
        for part in list(self._partitions.values()):
            at_end = self.until_caught_up and part.eof is not None
            self._flush(consumer, part, now, draining=at_end)
        self._apply_backpressure(consumer)

    def _handle(self, message: Any, now: float) -> None:
        error = message.error()
        part = self._partitions.get(message.partition())
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                if part is not None:
                    part.eof = message.offset()
                return
            if error.fatal():
                raise WorkerError(f"fatal Kafka error: {error.str()}")
            log.warning("kafka_error", code=error.name(), error=error.str())
            return
        if part is None:  # a message for a partition revoked meanwhile
            return
        part.add(StoredDeadLetter.from_message(message), now)
        self.counters.consumed += 1

    def _flush(
        self, consumer: Consumer, part: PartitionArchive, now: float, *, draining: bool
    ) -> None:
        """Store the partition's next range if one is due, and commit past it."""
        if now < part.retry_at:
            return
        if part.cut is None:
            due = draining or flush_due(
                len(part.records),
                part.buffered_bytes,
                part.read_at[0] if part.read_at else None,
                self._limits,
                now,
            )
            part.cut = plan_cut(part.records, part.read_at, self._limits, now, due=due)
            if part.cut is None:
                return
        elif not self._cut_reachable(part):
            return
        try:
            stored = self._store_range(consumer, part, part.cut)
        except TransientError as exc:
            part.failures += 1
            delay = retry_delay_s(part.failures)
            part.retry_at = now + delay
            log.warning(
                "archive_paused",
                partition=part.partition,
                first_offset=part.start,
                last_offset=part.cut,
                failures=part.failures,
                retry_in_s=delay,
                error=str(exc),
            )
            return
        self._count_and_log(part, stored)
        part.start, part.cut, part.cut_committed = part.cut + 1, None, False
        part.failures, part.retry_at = 0, 0.0

    def _store_range(
        self, consumer: Consumer, part: PartitionArchive, cut: int
    ) -> list[ArchiveObject]:
        assert part.start is not None
        if not part.cut_committed:
            self._commit(consumer, part.partition, part.start, f"{CUT_METADATA}{cut}")
            part.cut_committed = True
        records = [r for r in part.records if r.offset <= cut]
        objects = build_objects(
            records,
            part.partition,
            part.start,
            cut,
            self.settings.archive.prefix,
            self._decode,
        )
        for item in objects:
            self._store.put(item.key, item.body)
        part.take_through(cut)
        try:
            self._commit(consumer, part.partition, cut + 1, "")
        except TransientError as exc:
            # Stored but not committed: the next range's first commit moves the
            # offset, and a crash before it stores the same objects again.
            log.warning(
                "archive_commit_failed", partition=part.partition, error=str(exc)
            )
        return objects

    def _drain(self, consumer: Consumer) -> None:
        """Store every range that can be stored now, then commit drained ends."""
        for part in list(self._partitions.values()):
            while part.records:
                before = part.start
                self._flush(consumer, part, self._clock(), draining=True)
                if part.start == before:  # failed, or a chunk set still open
                    break
        self._commit_idle_positions(consumer)

    def _commit_idle_positions(self, consumer: Consumer) -> None:
        """Move a drained partition's offset to its end, past transaction
        markers, so the group's lag reads zero; the next range starts there."""
        for part in self._partitions.values():
            if part.records or part.cut is not None or part.eof is None:
                continue
            if part.start is not None and part.eof <= part.start:
                continue
            try:
                self._commit(consumer, part.partition, part.eof, "")
            except TransientError as exc:
                log.warning(
                    "archive_commit_failed", partition=part.partition, error=str(exc)
                )
                continue
            part.start = part.eof

    def _cut_reachable(self, part: PartitionArchive) -> bool:
        """Whether a range end taken over from a previous owner has been read."""
        assert part.cut is not None
        if part.records and part.records[-1].offset >= part.cut:
            return True
        gone = (part.records and part.records[0].offset > part.cut) or (
            not part.records and part.eof is not None and part.eof > part.cut
        )
        if gone:  # deleted by retention before it was archived again
            log.warning("archive_range_expired", partition=part.partition, cut=part.cut)
            part.start, part.cut, part.cut_committed = part.cut + 1, None, False
        return False

    def _commit(
        self, consumer: Consumer, partition: int, offset: int, metadata: str
    ) -> None:
        tp = TopicPartition(self._topic, partition, offset, metadata=metadata)
        try:
            result = consumer.commit(offsets=[tp], asynchronous=False)
        except KafkaException as exc:
            raise TransientError(
                f"commit of {self._topic}[{partition}] at {offset} failed: "
                f"{exc.args[0]}"
            ) from exc
        errors = [t.error for t in result or [] if t.error is not None]
        if errors:
            raise TransientError(
                f"commit of {self._topic}[{partition}] at {offset} failed: {errors[0]}"
            )

    def _decode(self, topic: str, value: bytes | None) -> dict[str, Any] | None:
        """The record as the worker decodes it, or None. Best effort: a value
        that does not decode, or a schema registry that cannot answer now,
        leaves "decoded" null rather than holding the archive back."""
        route = self._routes.get(topic)
        if route is None:
            return None
        try:
            return route.decoder.decode(value)
        except WorkerError:
            return None

    def _count_and_log(
        self, part: PartitionArchive, stored: list[ArchiveObject]
    ) -> None:
        lines = sum(item.lines for item in stored)
        fragments = sum(item.fragments for item in stored)
        self.counters.ranges += 1
        self.counters.objects += len(stored)
        self.counters.archived += lines - fragments
        self.counters.fragments += fragments
        log.info(
            "archive_range_stored",
            partition=part.partition,
            first_offset=part.start,
            last_offset=part.cut,
            objects=[item.key for item in stored],
            lines=lines,
            fragments=fragments,
            bytes=sum(len(item.body) for item in stored),
        )

    # -- flow control and rebalances ---------------------------------------------

    def _apply_backpressure(self, consumer: Consumer) -> None:
        """Stop reading a partition while its range fails or its buffer overflows."""
        for part in self._partitions.values():
            hold = part.failures > 0 or part.buffered_bytes > 2 * self._limits.max_bytes
            if hold != part.paused:
                tp = [TopicPartition(self._topic, part.partition)]
                consumer.pause(tp) if hold else consumer.resume(tp)
                part.paused = hold

    def _caught_up(self) -> bool:
        if not self._partitions:
            return False
        now = self._clock()
        return all(
            part.eof is not None
            and part.eof >= part.end_at_start
            and part.cut is None
            and plan_cut(part.records, part.read_at, self._limits, now, due=True)
            is None
            for part in self._partitions.values()
        )

    def _buffered(self) -> int:
        return sum(len(part.records) for part in self._partitions.values())

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=METADATA_TIMEOUT_S)
        for tp in committed:
            part = PartitionArchive(tp.partition)
            if tp.offset >= 0:
                part.start = tp.offset
                part.cut = parse_cut(tp.metadata, tp.offset)
                part.cut_committed = part.cut is not None
            if self.until_caught_up:
                _, high = consumer.get_watermark_offsets(tp, timeout=METADATA_TIMEOUT_S)
                part.end_at_start = high
            self._partitions[tp.partition] = part
        log.info(
            "partitions_assigned",
            partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions],
            resumed_cuts={
                p.partition: p.cut for p in self._partitions.values() if p.cut
            },
        )

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Archive what the revoked partitions hold (unless closing), forget them."""
        for tp in partitions:
            part = self._partitions.get(tp.partition)
            if part is not None and not self._closing:
                self._flush(consumer, part, self._clock(), draining=True)
            self._partitions.pop(tp.partition, None)
        log.info(
            "partitions_revoked",
            partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions],
        )

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._partitions.pop(tp.partition, None)
        log.warning(
            "partitions_lost",
            partitions=[f"{tp.topic}[{tp.partition}]" for tp in partitions],
        )


def archive_group_id(settings: Settings) -> str:
    """The archiver's consumer group: its own, never the worker's."""
    return settings.archive.group_id or f"{settings.kafka.group_id}-archiver"


def archiver_consumer_config(settings: Settings) -> dict[str, Any]:
    """The worker's consumer properties with the archiver's group and client id."""
    config = kafka_client_config(settings, "consumer")
    config["group.id"] = archive_group_id(settings)
    config["client.id"] = "cio-worker-archiver"
    return config


@contextmanager
def background_archiver(settings: Settings) -> Iterator[Archiver | None]:
    """Run the archiver in a thread beside ``cio-worker run`` when ``[archive]
    enabled``; a no-op otherwise. An archiver failure is logged and never stops
    delivery; on exit the archiver stores what it can and stops."""
    if not settings.archive.enabled:
        yield None
        return
    archiver = Archiver(settings)
    thread = threading.Thread(
        target=_run_in_background, args=(archiver,), name="cio-archive", daemon=True
    )
    thread.start()
    try:
        yield archiver
    finally:
        archiver.request_stop()
        thread.join(BACKGROUND_STOP_TIMEOUT_S)
        if thread.is_alive():
            log.warning("archiver_stop_timed_out")


def _run_in_background(archiver: Archiver) -> None:
    try:
        archiver.run()
    except Exception:
        log.error("archiver_failed", exc_info=True)
