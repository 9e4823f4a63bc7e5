"""Phase A, the ceiling: a plain consumer that only reads and decodes.

No mapping, no batching, no HTTP, no transactions: confluent-kafka's
``consume`` and fastavro's ``schemaless_reader`` for every value, which is the
least any Python consumer of these topics must do. It runs as its own process
and prints one JSON line of progress every half second and a summary last::

    python -m bench.ceiling --bootstrap 127.0.0.1:19292 \
        --person-topic P --event-topic E --records 1000000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from worker.avro import load_schema

SAMPLE_INTERVAL_S = 0.5
CONSUME_BATCH = 1000
POLL_TIMEOUT_S = 0.1
METADATA_TIMEOUT_S = 10.0


Ends = dict[tuple[str, int], int]


def assigned_consumer(
    bootstrap: str, topics: list[str], group: str, sample: int | None = None
) -> tuple[Consumer, Ends]:
    """A consumer on every partition of ``topics`` from the start, no group join,
    and where to stop in each partition.

    With a ``sample``, each partition is read only to its share of it, so a
    sample keeps the topics' mix of people and events (read whole, the first
    thousands of records would all come from whichever partitions answer first).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "isolation.level": "read_committed",  # as the worker reads
        }
    )
    metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
    partitions = [
        TopicPartition(topic, partition, OFFSET_BEGINNING)
        for topic in topics
        for partition in metadata.topics[topic].partitions
    ]
    highs = {
        (tp.topic, tp.partition): consumer.get_watermark_offsets(
            tp, timeout=METADATA_TIMEOUT_S
        )[1]
        for tp in partitions
    }
    total = max(sum(highs.values()), 1)
    if sample is not None and sample < total:
        highs = {tp: round(sample * high / total) for tp, high in highs.items()}
    consumer.assign(partitions)
    return consumer, highs


def read_records(
    consumer: Consumer,
    ends: Ends,
    timeout_s: float,
    handle: Callable[[Any], None],
) -> dict[str, float]:
    """Feed each partition's messages up to its end to ``handle``; print
    progress as JSON lines."""
    limit = sum(ends.values())
    started = time.monotonic()
    deadline = started + timeout_s
    count, first_s, next_sample = 0, 0.0, started
    while count < limit and time.monotonic() < deadline:
        for message in consumer.consume(CONSUME_BATCH, timeout=POLL_TIMEOUT_S):
            if message.error() is not None:
                continue
            key = (str(message.topic()), int(message.partition() or 0))
            if int(message.offset() or 0) >= ends[key]:
                continue  # past this partition's share of the sample
            if not first_s:
                first_s = time.monotonic() - started
            handle(message)
            count += 1
        now = time.monotonic()
        if now >= next_sample:
            _emit({"t": round(now - started, 3), "n": count})
            next_sample = now + SAMPLE_INTERVAL_S
    seconds = time.monotonic() - started
    _emit({"t": round(seconds, 3), "n": count})
    return {"records": count, "seconds": seconds, "first_record_s": first_s}


def _emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--person-topic", required=True)
    parser.add_argument("--event-topic", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = parser.parse_args(argv)

    schemas = {
        args.person_topic: load_schema(Path("schemas/person.avsc")),
        args.event_topic: load_schema(Path("schemas/person_event.avsc")),
    }
    reader = fastavro.schemaless_reader

    def decode(message: Any) -> None:
        reader(io.BytesIO(message.value()), schemas[message.topic()], None)

    topics = [args.person_topic, args.event_topic]
    consumer, ends = assigned_consumer(args.bootstrap, topics, "bench-ceiling")
    try:
        summary = read_records(consumer, ends, args.timeout_s, decode)
    finally:
        consumer.close()
    _emit({"summary": summary})
    return 0 if summary["records"] == args.records else 1


if __name__ == "__main__":
    sys.exit(main())
