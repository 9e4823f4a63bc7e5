"""The worker's per-record path without a broker: decode, map, check, dedupe,
batch, on the benchmark's own records, in this process.

``make bench`` measures the whole system (broker, simulator and worker on the
same cores); this measures only the loop thread's work per record, so a change
to the hot path can be compared in seconds and without noise from the broker::

    .venv/bin/python -m bench.hotpath --records 200000
    .venv/bin/python -m bench.hotpath --records 200000 --profile  # cProfile top

It prints one JSON line: CPU microseconds per record for each stage and in
all (best of ``--repeat``), and the records per second one core could carry
at that cost.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import sys
import time
from types import SimpleNamespace
from typing import Any

from confluent_kafka import Message

from bench.data import RecordMaker
from worker.avro import AvroDecoder
from worker.batcher import BatchLimits, PartitionBuffer
from worker.loop import Worker
from worker.pipeline import Kind, TopicRoute, to_item
from worker.state import EventDedupe, PartitionState, PersonDedupe

PERSON_TOPIC = "bench.persons"
EVENT_TOPIC = "bench.person-events"
PARTITIONS = 6
TIMESTAMP_CREATE_TIME = 1
FIRST_TIMESTAMP_MS = 1_760_000_000_000


def messages(records: int, seed: int = 7) -> list[Any]:
    """The benchmark's records as consumed messages, spread over partitions."""
    maker = RecordMaker(round(records * 0.3), seed)
    offsets = {PERSON_TOPIC: [0] * PARTITIONS, EVENT_TOPIC: [0] * PARTITIONS}
    out = []
    for index in range(records):
        kind, key, record = maker.next_record()
        topic = PERSON_TOPIC if kind == "person" else EVENT_TOPIC
        partition = hash(key) % PARTITIONS
        offset = offsets[topic][partition]
        offsets[topic][partition] += 1
        out.append(
            Message(
                topic=topic,
                partition=partition,
                offset=offset,
                key=key,
                value=maker.encode(kind, record),
                timestamp=(TIMESTAMP_CREATE_TIME, FIRST_TIMESTAMP_MS + index),
            )
        )
    return out


def routes() -> dict[str, TopicRoute]:
    maker = RecordMaker(1)
    return {
        PERSON_TOPIC: TopicRoute(Kind.PERSON, AvroDecoder(maker.person_schema)),
        EVENT_TOPIC: TopicRoute(Kind.EVENT, AvroDecoder(maker.event_schema)),
    }


def run(batch: list[Any], table: dict[str, TopicRoute]) -> dict[str, float]:
    """Each stage over every message; seconds per stage."""
    loop = SimpleNamespace(
        _states={p: PartitionState() for p in range(PARTITIONS)},
        _person_dedupe=PersonDedupe.UNCHANGED,
        _event_dedupe=EventDedupe.ID,
        _ignore_state=False,
        _wall_clock=time.time,
    )
    limits = BatchLimits(1000, 500_000, 0.2)
    buffers = {
        (t, p): PartitionBuffer(t, p, limits)
        for t in (PERSON_TOPIC, EVENT_TOPIC)
        for p in range(PARTITIONS)
    }
    dedupe = Worker._dedupe
    clock = time.process_time  # CPU of this process: less noise when shared
    started = clock()
    items = [to_item(message, table[message.topic()]) for message in batch]
    mapped = clock()
    for item, message in zip(items, batch, strict=True):
        dedupe(loop, item, message.partition())  # type: ignore[arg-type]
    deduped = clock()
    for item, message in zip(items, batch, strict=True):
        buffers[(message.topic(), message.partition())].add(item, 0.0)
    batched = clock()
    for buffer in buffers.values():
        buffer.seal_if_due(1.0, force=True)
        while (sealed := buffer.take_next()) is not None:
            sealed.body()
            buffer.complete(sealed)
    bodies = clock()
    rejected = sum(1 for item in items if item.reject is not None)
    if rejected:
        raise SystemExit(f"{rejected} records rejected: the benchmark data is wrong")
    return {
        "to_item": mapped - started,
        "dedupe": deduped - mapped,
        "batch": batched - deduped,
        "body": bodies - batched,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many")
    parser.add_argument("--profile", action="store_true", help="cProfile one pass")
    args = parser.parse_args(argv)
    batch = messages(args.records)
    table = routes()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(batch, table)
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        return 0
    best: dict[str, float] | None = None
    for _ in range(args.repeat):
        gc.collect()
        seconds = run(batch, table)
        if best is None or sum(seconds.values()) < sum(best.values()):
            best = seconds
    assert best is not None
    us = {k: round(v / args.records * 1e6, 2) for k, v in best.items()}
    total = sum(best.values()) / args.records * 1e6
    print(
        json.dumps(
            {
                "records": args.records,
                "us_per_record": us,
                "us_per_record_total": round(total, 2),
                "records_per_s_one_core": round(1e6 / total),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
