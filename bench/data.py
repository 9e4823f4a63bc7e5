"""The benchmark's records: about 30 % people with 20 attributes, 70 % events.

Records come from the sandbox's own ``person_record`` and ``event_record``, so
they look like the demo's; a person gets 12 free-form preferences and a score
beside the 7 named fields (20 attributes). Records are keyed by email, so one
person's records share a partition, and written as plain Avro to topics of six
partitions each.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from worker.avro import encode, load_schema, read_record
from worker.batcher import BODY_OVERHEAD_BYTES
from worker.limits import checked_entry
from worker.mapping import Coordinates, RecordShape, TopicMapping, to_event, to_identify
from worker.sandbox.sample import create_topics, event_record, person_record

PERSON_SHARE = 0.3
# 7 named fields + 12 preferences + score: 20 attributes per person.
PERSON_EXTRA_ATTRIBUTES = 12
PARTITIONS = 6
SCHEMAS = Path("schemas")
PRODUCE_TIMEOUT_S = 300.0
# Records whose entries are measured to size a full request.
SIZE_SAMPLE = 20_000
# Distinct attribute sets drawn per kind (see RecordMaker).
POOL = 4096
FIRST_EVENT_TIME_S = 1_760_000_000


@dataclass(frozen=True, slots=True)
class Topics:
    """One set of input topics and the dead-letter topic the worker needs."""

    person: str
    event: str
    dead_letter: str

    @classmethod
    def fresh(cls, label: str) -> Topics:
        run = f"bench-{label}-{uuid.uuid4().hex[:6]}"
        return cls(f"{run}.persons", f"{run}.person-events", f"{run}.dead-letters")

    def create(self, bootstrap: str) -> None:
        create_topics(
            bootstrap,
            {self.person: PARTITIONS, self.event: PARTITIONS, self.dead_letter: 1},
        )


class RecordMaker:
    """Deterministic person and event records for ``people`` distinct people.

    Attribute values come from pools of ``POOL`` records drawn once, so
    writing a million records costs an Avro encode each, not a dozen random
    draws; every record still has its own person (and an event its own
    timestamp).
    """

    def __init__(self, people: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.person_schema = load_schema(SCHEMAS / "person.avsc")
        self.event_schema = load_schema(SCHEMAS / "person_event.avsc")
        self.emails = [f"user{i:07d}@example.com" for i in range(max(people, 1))]
        self._people_pool = [
            person_record("", self.rng, PERSON_EXTRA_ATTRIBUTES) for _ in range(POOL)
        ]
        self._events_pool = [event_record("", self.rng, 0) for _ in range(POOL)]
        self._next_person = 0
        self._events = 0

    def next_record(self) -> tuple[str, bytes, dict[str, Any]]:
        """("person" or "event", key, record), about 30 % people."""
        if self.rng.random() < PERSON_SHARE:
            email = self.emails[self._next_person % len(self.emails)]
            template = self._people_pool[self._next_person % POOL]
            self._next_person += 1
            return "person", email.encode(), {**template, "person_email": email}
        email = self.emails[int(self.rng.random() * len(self.emails))]
        template = self._events_pool[self._events % POOL]
        record = {
            **template,
            "person_email": email,
            "timestamp": FIRST_EVENT_TIME_S + self._events,
        }
        self._events += 1
        return "event", email.encode(), record

    def encode(self, kind: str, record: dict[str, Any]) -> bytes:
        schema = self.person_schema if kind == "person" else self.event_schema
        return encode(schema, record)


def preload(bootstrap: str, topics: Topics, records: int, seed: int = 7) -> float:
    """Write ``records`` records; return the seconds it took."""
    maker = RecordMaker(round(records * PERSON_SHARE), seed)
    producer = bulk_producer(bootstrap)
    names = {"person": topics.person, "event": topics.event}
    started = time.monotonic()
    for _ in range(records):
        kind, key, record = maker.next_record()
        produce(producer, names[kind], key, maker.encode(kind, record))
    if producer.flush(PRODUCE_TIMEOUT_S):
        raise RuntimeError("the broker did not take every benchmark record")
    return time.monotonic() - started


def bulk_producer(bootstrap: str, linger_ms: int = 50) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": linger_ms,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
            "enable.idempotence": True,
        }
    )


def produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


def paced(rate_per_s: float, duration_s: float) -> Iterator[float]:
    """Yield once per record at a steady rate, bounded by count and time."""
    total = int(rate_per_s * duration_s)
    started = time.monotonic()
    for index in range(total):
        due = started + index / rate_per_s
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if time.monotonic() - started > duration_s + 5:
            return  # fell far behind: stop rather than run on
        yield due


@dataclass(frozen=True, slots=True)
class EntrySizes:
    """Mean bytes of the entries the worker builds from this data."""

    person_bytes: float
    event_bytes: float
    mean_bytes: float

    def entries_per_request(self, max_request_bytes: int) -> int:
        """Entries of mean size (plus a comma each) under the request limit."""
        return int((max_request_bytes - BODY_OVERHEAD_BYTES) // (self.mean_bytes + 1))


def entry_sizes(sample: int = SIZE_SAMPLE, seed: int = 7) -> EntrySizes:
    """Map a sample of the data with the worker's own mapping and measure it."""
    maker = RecordMaker(round(sample * PERSON_SHARE), seed)
    person = _mapper(maker.person_schema, "person")
    event = _mapper(maker.event_schema, "event")
    sizes: dict[str, list[int]] = {"person": [], "event": []}
    for offset in range(sample):
        kind, _, record = maker.next_record()
        mapper = person if kind == "person" else event
        schema = maker.person_schema if kind == "person" else maker.event_schema
        decoded = read_record(encode(schema, record), 0, schema, None)
        sizes[kind].append(len(checked_entry(mapper(decoded, offset))))
    every = sizes["person"] + sizes["event"]
    return EntrySizes(
        sum(sizes["person"]) / max(len(sizes["person"]), 1),
        sum(sizes["event"]) / max(len(sizes["event"]), 1),
        sum(every) / len(every),
    )


def _mapper(schema: Any, kind: str) -> Callable[[dict[str, Any], int], dict[str, Any]]:
    mapping = TopicMapping(shape=RecordShape.of(schema))
    if kind == "person":
        return lambda record, offset: to_identify(record, mapping)
    now_ms = int(time.time() * 1000)
    return lambda record, offset: to_event(
        record, Coordinates("bench.person-events", 0, offset, now_ms), mapping
    )
