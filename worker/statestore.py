"""The state topic: creating it, restoring partitions from it, sizing it.

The state topic is compacted and has as many partitions as the widest input
topic; input partition ``p`` of either topic keeps its state in state partition
``p``, so a worker that owns an input partition restores exactly one state
partition. Person and event keys never collide (see ``state``), so the person
and event partitions numbered ``p`` share it safely.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from worker.errors import ConfigError, TransientError
from worker.state import PartitionState

log = structlog.get_logger(__name__)

RESTORE_POLL_S = 0.5
RESTORE_IDLE_TIMEOUT_S = 60.0
ADMIN_TIMEOUT_S = 30.0
STATE_TOPIC_CONFIG = {
    "cleanup.policy": "compact",
    # Compact soon after writes so a restore reads few superseded records.
    "min.cleanable.dirty.ratio": "0.1",
    "segment.ms": "3600000",
    "delete.retention.ms": "86400000",
}


def ensure_state_topic(
    admin: AdminClient, name: str, partitions: int, replication: int = -1
) -> int:
    """Create the compacted state topic if missing; return its partition count.

    Raises ConfigError when it exists with fewer partitions than an input topic,
    since then some input partition would have no matching state partition.
    """
    metadata = admin.list_topics(timeout=ADMIN_TIMEOUT_S)
    existing = metadata.topics.get(name)
    if existing is not None and not existing.error:
        count = len(existing.partitions)
        if count < partitions:
            raise ConfigError(
                f"state topic {name} has {count} partitions but the input topics have "
                f"{partitions}; add partitions to it (kafka-topics --alter) or set "
                "CIO_STATE__TOPIC to a new name"
            )
        return count
    topic = NewTopic(
        name,
        num_partitions=partitions,
        replication_factor=replication,
        config=STATE_TOPIC_CONFIG,
    )
    future = admin.create_topics([topic], operation_timeout=ADMIN_TIMEOUT_S)[name]
    try:
        future.result()
    except Exception as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise ConfigError(f"cannot create state topic {name}: {exc}") from exc
    log.info("state_topic_created", topic=name, partitions=partitions)
    return partitions


# Answers that mean "ask again shortly": a topic just created has no leader
# yet, or leadership is moving.
RETRIABLE_METADATA_CODES = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
WATERMARK_TIMEOUT_S = 10.0
WATERMARK_DEADLINE_S = 60.0


def watermarks(consumer: Consumer, partition: TopicPartition) -> tuple[int, int]:
    """(low, high) offsets of a partition, asking again while it has no leader.

    Raises TransientError if no answer came within WATERMARK_DEADLINE_S.
    """
    deadline = time.monotonic() + WATERMARK_DEADLINE_S
    wait_s = 0.1
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                partition, timeout=WATERMARK_TIMEOUT_S
            )
            return int(low), int(high)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() not in RETRIABLE_METADATA_CODES:
                raise TransientError(f"cannot read offsets: {error.str()}") from exc
            if time.monotonic() + wait_s > deadline:
                raise TransientError(
                    f"no leader for {partition.topic}[{partition.partition}] "
                    f"after {WATERMARK_DEADLINE_S:.0f} s: {error.str()}"
                ) from exc
            log.debug("watermarks_retry", error=error.str(), wait_s=wait_s)
            time.sleep(wait_s)
            wait_s = min(wait_s * 2, 2.0)


def restore(
    config: dict[str, Any],
    topic: str,
    partitions: Iterable[int],
    *,
    progress: Callable[[int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> dict[int, PartitionState]:
    """Read state partitions from the beginning to their end, committed data only.

    The end is where the broker reports end of partition for a read_committed
    reader (the last stable offset), so tombstones, compaction gaps and an
    aborted transaction at the end all finish the restore. Raises
    TransientError if the broker stops answering for RESTORE_IDLE_TIMEOUT_S.
    """
    wanted = sorted(set(partitions))
    states = {p: PartitionState() for p in wanted}
    if not wanted:
        return states
    consumer = Consumer(
        {
            **config,
            "group.id": "cio-worker-state-restore",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            # Bounds the fetch buffer while restoring; state records are small.
            "queued.max.messages.kbytes": 16384,
        }
    )
    started = clock()
    loaded = 0
    try:
        pending = set()
        for p in wanted:
            low, high = watermarks(consumer, TopicPartition(topic, p))
            if high > low:
                pending.add(p)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        last_progress = clock()
        while pending:
            messages = consumer.consume(10_000, timeout=RESTORE_POLL_S)
            if messages:
                last_progress = clock()
            elif clock() - last_progress > RESTORE_IDLE_TIMEOUT_S:
                raise TransientError(
                    f"state restore of {topic} stalled; partitions {sorted(pending)} "
                    "did not reach their end"
                )
            for message in messages:
                error = message.error()
                if error is None:
                    partition = int(message.partition() or 0)
                    states[partition].load(message.key() or b"", message.value())
                    loaded += 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    log.warning("state_restore_error", error=error.str())
            if progress is not None:
                progress(loaded, len(pending))
    finally:
        consumer.close()
    log.info(
        "state_restored",
        topic=topic,
        partitions=wanted,
        records=loaded,
        keys=sum(len(s) for s in states.values()),
        seconds=round(clock() - started, 3),
    )
    return states
