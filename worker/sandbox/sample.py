"""Realistic sample data for the demo, the tests and the benchmark.

``build_sample`` returns Kafka records for the person and event topics: people
with a profile of typical attributes, events they perform, and a known number
of records that must be rejected, each with the stage and reason expected.
Records are keyed by email, so one person's records share a partition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from worker.avro import encode, load_schema

PLANS = ("free", "starter", "growth", "enterprise")
COUNTRIES = ("US", "DE", "FR", "BR", "JP", "IN", "GB", "CA")
EVENTS = ("page_viewed", "signed_in", "added_to_cart", "purchased", "invited_friend")


@dataclass(frozen=True, slots=True)
class SampleRecord:
    topic_kind: str  # "person" or "event"
    key: bytes
    value: bytes
    expected_reject: tuple[str, str] | None = None  # (stage, reason)


@dataclass(slots=True)
class Sample:
    records: list[SampleRecord] = field(default_factory=list)

    @property
    def expected_rejects(self) -> int:
        return sum(1 for r in self.records if r.expected_reject is not None)


def build_sample(
    people: int,
    events: int,
    schemas_dir: Path = Path("schemas"),
    *,
    extra_attributes: int = 4,
    bad: bool = True,
    seed: int = 7,
) -> Sample:
    """People and events in a realistic mix, plus (if ``bad``) records to refuse."""
    rng = random.Random(seed)
    person_schema = load_schema(schemas_dir / "person.avsc")
    event_schema = load_schema(schemas_dir / "person_event.avsc")
    sample = Sample()
    emails = [f"user{i:07d}@example.com" for i in range(max(people, 1))]

    for i in range(people):
        record = person_record(emails[i], rng, extra_attributes)
        value = encode(person_schema, record)
        sample.records.append(SampleRecord("person", emails[i].encode(), value))
    for i in range(events):
        email = rng.choice(emails)
        record = event_record(email, rng, i)
        value = encode(event_schema, record)
        sample.records.append(SampleRecord("event", email.encode(), value))
    if bad:
        sample.records.extend(bad_records(person_schema, event_schema))
    rng.shuffle(sample.records)
    return sample


def person_record(email: str, rng: random.Random, extra: int) -> dict[str, Any]:
    first = rng.choice(("Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken"))
    attributes: dict[str, Any] = {
        f"pref_{n}": rng.choice(("on", "off", "weekly")) for n in range(extra)
    }
    attributes["score"] = rng.randint(0, 1000)
    return {
        "person_email": email,
        "first_name": first,
        "last_name": rng.choice(("Lovelace", "Hopper", "Turing", "Liskov")),
        "plan": rng.choice(PLANS),
        "country": rng.choice(COUNTRIES),
        "created_at": 1_700_000_000 + rng.randint(0, 30_000_000),
        "lifetime_value": round(rng.uniform(0, 5000), 2),
        "is_active": rng.random() < 0.8,
        "attributes": attributes,
    }


def event_record(email: str, rng: random.Random, index: int) -> dict[str, Any]:
    name = rng.choice(EVENTS)
    return {
        "person_email": email,
        "event_name": name,
        # Half the events carry their own id; the rest get one derived.
        "event_id": None,
        "timestamp": 1_760_000_000 + index,
        "value": round(rng.uniform(1, 300), 2) if name == "purchased" else None,
        "currency": "USD" if name == "purchased" else None,
        "data": {"path": f"/p/{rng.randint(1, 500)}", "session": rng.randint(1, 9999)},
    }


def bad_records(person_schema: Any, event_schema: Any) -> list[SampleRecord]:
    """Records that must be refused, each with its expected stage and reason."""
    records: list[SampleRecord] = []
    for n in range(4):
        email = f"bad-name-{n}@example.com"
        event = {
            "person_email": email,
            "event_name": "x" * 101,  # Customer.io: event names are 100 bytes at most
            "timestamp": 1_760_000_000,
        }
        records.append(
            SampleRecord(
                "event",
                email.encode(),
                encode(event_schema, event),
                ("validate", "event_name_too_long"),
            )
        )
    for n in range(3):
        email = f"bad-attr-{n}@example.com"
        person = {"person_email": email, "first_name": "é" * 600}  # 1,200 bytes
        records.append(
            SampleRecord(
                "person",
                email.encode(),
                encode(person_schema, person),
                ("validate", "attribute_value_too_long"),
            )
        )
    for n in range(3):
        records.append(
            SampleRecord(
                "event",
                f"garbage-{n}".encode(),
                b'{"person_email": "not avro"}',
                ("decode", "not_avro"),
            )
        )
    return records


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create topics with the given partition counts; existing ones are kept."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(name, partitions, 1) for name, partitions in topics.items()]
    for name, future in admin.create_topics(new, operation_timeout=30).items():
        try:
            future.result()
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"cannot create topic {name}: {exc}") from exc


def produce(
    bootstrap: str, sample: Sample, person_topic: str, event_topic: str
) -> None:
    """Write every sample record to its topic and wait until all are stored."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True}
    )
    topics = {"person": person_topic, "event": event_topic}
    for record in sample.records:
        while True:
            try:
                producer.produce(
                    topics[record.topic_kind], key=record.key, value=record.value
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise RuntimeError(f"{remaining} sample records were not written")
