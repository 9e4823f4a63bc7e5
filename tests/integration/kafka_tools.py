"""Reading back what the worker left on the broker: offsets and dead letters."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The high watermark of every partition of a topic."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        consumer.close()


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offset for every partition of a topic (-1001: none).

    Read without waiting for open transactions (require_stable false), so a
    killed worker's unfinished transaction does not hold the answer up.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    request = ConsumerGroupTopicPartitions(
        group, [TopicPartition(topic, p) for p in partitions]
    )
    result = admin.list_consumer_group_offsets(
        [request], require_stable=False, request_timeout=10
    )[group].result()
    return {tp.partition: tp.offset for tp in result.topic_partitions}


def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Any]:
    """Every committed record of a topic, from the beginning to the end.

    The end is the broker's end-of-partition signal, which also covers the
    transaction markers that follow the last record of a transactional topic.
    """
    ends = end_offsets(bootstrap, topic)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    records: list[Any] = []
    pending = {p for p, end in ends.items() if end > 0}
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            assert time.monotonic() < deadline, f"{topic} not read to its end"
            for message in consumer.consume(500, timeout=0.2):
                error = message.error()
                if error is None:
                    records.append(message)
                elif (
                    error.code() == KafkaError._PARTITION_EOF
                    and message.offset() >= ends[message.partition()]
                ):
                    pending.discard(message.partition())
    finally:
        consumer.close()
    return records
