"""An edge-case corpus through the real broker, a registry stub and the simulator.

Records written by many producers over years: older and newer writer schemas,
registry-framed and plain bytes, every Avro type, values at and over every
limit, timestamps in every shape, tombstones. Each is either delivered exactly
as expected or dead-lettered with the expected stage and reason, and the worker
runs to the end of the topics without stopping.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from confluent_kafka import Producer
from fastavro import parse_schema

from tests.integration.conftest import ROOT, Topics
from tests.integration.kafka_tools import committed_offsets, end_offsets, read_all
from tests.integration.registry_stub import RegistryStub
from tests.integration.s3_server import read_archive
from worker.archive import Archiver
from worker.avro import encode, encode_framed
from worker.loop import Worker
from worker.rejects import header_map
from worker.sandbox.simulator import TrackSimulator
from worker.settings import load_settings

pytestmark = pytest.mark.integration

SCHEMA_DIR = Path("tests") / "integration" / "schemas"
PERSON_JSON = json.loads((ROOT / SCHEMA_DIR / "corpus_person.avsc").read_text())
EVENT_JSON = json.loads((ROOT / SCHEMA_DIR / "corpus_event.avsc").read_text())
NAMESPACE = "io.cioworker.corpus"


def enum(name: str, *symbols: str) -> dict[str, Any]:
    return {"type": "enum", "name": name, "symbols": list(symbols)}


# An older person writer: no newer fields, the Plan symbols in another order.
PERSON_OLD_JSON = {
    "type": "record",
    "name": "Person",
    "namespace": NAMESPACE,
    "fields": [
        {"name": "person_email", "type": "string"},
        {"name": "first_name", "type": ["null", "string"], "default": None},
        {
            "name": "plan",
            "type": ["null", enum("Plan", "PRO", "FREE")],
            "default": None,
        },
        {"name": "created_at", "type": ["null", "long"], "default": None},
    ],
}
# A newer person writer: an extra field and symbols the reader does not know.
PERSON_NEW_JSON = {
    "type": "record",
    "name": "Person",
    "namespace": NAMESPACE,
    "fields": [
        {"name": "person_email", "type": "string"},
        {"name": "nickname", "type": "string"},
        {
            "name": "plan",
            "type": enum("Plan", "FREE", "PRO", "ENTERPRISE"),
        },
        {
            "name": "tier",
            "type": enum("Tier", "BRONZE", "SILVER", "GOLD", "PLATINUM"),
        },
    ],
}
# A writer whose person_email is a number: it cannot be read as the reader's.
PERSON_CLASH_JSON = {
    "type": "record",
    "name": "Person",
    "namespace": NAMESPACE,
    "fields": [{"name": "person_email", "type": "long"}],
}
EVENT_OLD_JSON = {
    "type": "record",
    "name": "PersonEvent",
    "namespace": NAMESPACE,
    "fields": [
        {"name": "person_email", "type": "string"},
        {"name": "event_name", "type": "string"},
        {"name": "timestamp", "type": "long"},
        {"name": "data", "type": {"type": "map", "values": "string"}},
    ],
}

# A writer whose address type is registered under another subject (a schema
# reference), without the reader's geo field.
ADDRESS_JSON = {
    "type": "record",
    "name": "Address",
    "namespace": NAMESPACE,
    "fields": [{"name": "city", "type": "string"},
               {"name": "zip", "type": ["null", "string"], "default": None}],
}  # fmt: skip
PERSON_REF_JSON = {
    "type": "record",
    "name": "Person",
    "namespace": NAMESPACE,
    "fields": [{"name": "person_email", "type": "string"},
               {"name": "address", "type": f"{NAMESPACE}.Address"}],
}  # fmt: skip
ADDRESS_SUBJECT = "corpus-address"
REFERENCES = {
    5: [{"name": f"{NAMESPACE}.Address", "subject": ADDRESS_SUBJECT, "version": 1}],
    6: [{"name": f"{NAMESPACE}.Address", "subject": "deleted-subject", "version": 4}],
}
SUBJECTS = {(ADDRESS_SUBJECT, 1): (ADDRESS_JSON, [])}

PERSON_ID, PERSON_OLD_ID, PERSON_NEW_ID, PERSON_CLASH_ID = 1, 2, 3, 4
PERSON_REF_ID, PERSON_BAD_REF_ID = 5, 6
EVENT_ID, EVENT_OLD_ID, PROTOBUF_ID, UNKNOWN_ID = 10, 11, 12, 99
REGISTRY_SCHEMAS: dict[int, Any] = {
    PERSON_ID: PERSON_JSON,
    PERSON_OLD_ID: PERSON_OLD_JSON,
    PERSON_NEW_ID: PERSON_NEW_JSON,
    PERSON_CLASH_ID: PERSON_CLASH_JSON,
    EVENT_ID: EVENT_JSON,
    EVENT_OLD_ID: EVENT_OLD_JSON,
    PROTOBUF_ID: 'syntax = "proto3"; message P { string email = 1; }',
    PERSON_REF_ID: PERSON_REF_JSON,
    PERSON_BAD_REF_ID: PERSON_REF_JSON,
}
PARSED = {
    i: parse_schema(s)
    for i, s in REGISTRY_SCHEMAS.items()
    if i not in (PROTOBUF_ID, PERSON_REF_ID, PERSON_BAD_REF_ID)
}
_ADDRESS_NAMED: dict[str, Any] = {}
parse_schema(ADDRESS_JSON, _ADDRESS_NAMED)
PARSED[PERSON_REF_ID] = PARSED[PERSON_BAD_REF_ID] = parse_schema(
    PERSON_REF_JSON, _ADDRESS_NAMED
)
PERSON = PARSED[PERSON_ID]
EVENT = PARSED[EVENT_ID]
REGISTRY_USER, REGISTRY_PASSWORD = "corpus-reader", "corpus-registry-pw"

T = 1_700_000_000  # 2023-11-14T22:13:20Z
LAST_SEEN = datetime(2024, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
GIVEN_ULID = "01HGW1Z9K2X3Y4Z5A6B7C8D9E0"
UUID_TEXT = "6b30fa27-9e05-4818-8e68-a9e194ddc832"
UUID_AS_ULID = "3B63X2F7G590C8WT59W6ADVJ1J"
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")


@dataclass
class ExpectedEvent:
    person: str
    timestamp: int | None
    attributes: dict[str, Any]
    event_id: str | None = None  # None: derived from the record's coordinates


@dataclass
class Corpus:
    """Records to produce, each with the outcome it must have."""

    records: list[tuple[str, bytes | None, bytes | None]] = field(default_factory=list)
    people: dict[str, dict[str, Any]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    events: dict[str, ExpectedEvent] = field(default_factory=dict)
    dead: dict[bytes | None, tuple[str, str]] = field(default_factory=dict)
    skipped: int = 0

    def person(
        self, email: str, value: bytes | None, attributes: dict[str, Any] | None
    ) -> None:
        """A person record keyed by email; None attributes: the person is gone."""
        self.records.append(("person", email.encode(), value))
        key = f"email:{email.lower()}"
        if attributes is None:
            self.people.pop(key, None)
            self.gone.add(key)
        else:
            self.people[key] = attributes

    def event(self, key: str, value: bytes, name: str, expected: ExpectedEvent) -> None:
        self.records.append(("event", key.encode(), value))
        self.events[name] = expected

    def refused(
        self, kind: str, value: bytes | None, stage: str, reason: str, key: Any = ""
    ) -> None:
        """A record that must be dead-lettered; its key is unique among them."""
        if key == "":
            key = f"dead-{len(self.dead):03d}".encode()
        assert key not in self.dead
        self.records.append((kind, key, value))
        self.dead[key] = (stage, reason)


def framed(schema_id: int, record: dict[str, Any]) -> bytes:
    return encode_framed(schema_id, PARSED[schema_id], record)


def person_record(email: str | None, **fields: Any) -> dict[str, Any]:
    return {"person_email": email, **fields}


def event_record(email: str | None, name: str, **fields: Any) -> dict[str, Any]:
    return {"person_email": email, "event_name": name, **fields}


def build_people(c: Corpus) -> None:
    """Person records: the person topic is registry-framed ("confluent")."""
    full = person_record(
        "Full@Example.com",
        person_id="u-1",
        first_name="Ada",
        plan="PRO",
        tier="GOLD",
        created_at=T,
        signup_ms=T * 1000 + 999,
        last_seen=LAST_SEEN,
        birthday=date(1990, 5, 17),
        balance=Decimal("1234.50"),
        ref=UUID(UUID_TEXT),
        avatar=b"\x89PNG",
        score=-0.5,
        address={"city": "Oslo", "zip": None, "geo": {"lat": 59.91, "lon": 10.75}},
        tags=["beta", "vip"],
        prefs={"news": "weekly"},
        attributes={"source": "import", "visits": 3, "ratio": 0.25, "ok": True},
    )
    c.person(
        "Full@Example.com",
        framed(PERSON_ID, full),
        {
            "person_id": "u-1",
            "first_name": "Ada",
            "plan": "PRO",
            "tier": "GOLD",
            "created_at": T,
            "signup_ms": T,
            "last_seen": int(LAST_SEEN.timestamp()),
            "birthday": "1990-05-17",
            "balance": "1234.50",
            "ref": UUID_TEXT,
            "avatar": "iVBORw==",
            "score": -0.5,
            "address.city": "Oslo",
            "address.geo.lat": 59.91,
            "address.geo.lon": 10.75,
            "tags": ["beta", "vip"],
            "prefs": {"news": "weekly"},
            "source": "import",
            "visits": 3,
            "ratio": 0.25,
            "ok": True,
        },
    )
    c.person("min@x.io", framed(PERSON_ID, person_record("min@x.io")), {})
    c.person(
        "nulls@x.io",
        framed(
            PERSON_ID,
            person_record(
                "nulls@x.io",
                first_name="",
                address=None,
                tags=[],
                prefs={},
                attributes={"gone": None, "zero": 0, "no": False, "blank": ""},
            ),
        ),
        {
            "first_name": "",
            "tags": [],
            "prefs": {},
            "zero": 0,
            "no": False,
            "blank": "",
        },
    )
    # older writer: reordered enum symbols, the reader's new fields default to null
    for email, plan in (("old-pro@x.io", "PRO"), ("old-free@x.io", "FREE")):
        record = person_record(email, first_name="Old", plan=plan, created_at=T)
        c.person(
            email,
            framed(PERSON_OLD_ID, record),
            {"first_name": "Old", "plan": plan, "created_at": T},
        )
    # newer writer: an extra field is dropped, an unknown Plan takes its default
    newer = person_record("new@x.io", nickname="N", plan="ENTERPRISE", tier="SILVER")
    c.person(
        "new@x.io",
        framed(PERSON_NEW_ID, newer),
        {"plan": "UNKNOWN", "tier": "SILVER"},
    )
    # a writer schema with a reference to another subject's Address type
    with_ref = {"person_email": "ref@x.io", "address": {"city": "Oslo", "zip": "0150"}}
    c.person(
        "ref@x.io",
        framed(PERSON_REF_ID, with_ref),
        {"address.city": "Oslo", "address.zip": "0150"},
    )
    for email, created_at in (
        ("iso-zone@x.io", "2023-11-15T00:13:20+02:00"),
        ("iso-utc@x.io", "2023-11-14T22:13:20Z"),
        ("iso-naive@x.io", "2023-11-14T22:13:20"),
        ("digits@x.io", "1700000000"),
    ):
        record = person_record(email, created_at=created_at)
        c.person(email, framed(PERSON_ID, record), {"created_at": T})
    # values exactly at the limits
    c.person(
        "value1000@x.io",
        framed(PERSON_ID, person_record("value1000@x.io", first_name="é" * 500)),
        {"first_name": "é" * 500},
    )
    c.person(
        "name150@x.io",
        framed(PERSON_ID, person_record("name150@x.io", attributes={"n" * 150: 1})),
        {"n" * 150: 1},
    )
    many = {f"k{i:03d}": i for i in range(300)}
    c.person(
        "attrs300@x.io",
        framed(PERSON_ID, person_record("attrs300@x.io", attributes=many)),
        many,
    )
    long_email = "a" * 145 + "@X.io"  # 150 bytes
    c.person(long_email, framed(PERSON_ID, person_record(long_email)), {})
    # delete: identified, then its tombstone removes it
    c.person("gone@x.io", framed(PERSON_ID, person_record("gone@x.io", plan="PRO")), {})
    c.person("gone@x.io", None, None)
    c.person("never-seen@x.io", None, None)


def build_bad_people(c: Corpus) -> None:
    """Person records that must be refused, each with its stage and reason."""
    ok = framed(PERSON_ID, person_record("x@x.io", first_name="X"))
    c.refused("person", None, "validate", "missing_identifier", key=None)
    c.refused("person", b"", "decode", "empty_value")
    c.refused("person", b'{"person_email": "json@x.io"}', "decode", "not_avro")
    c.refused("person", b"\x01" + ok[1:], "decode", "bad_magic_byte")
    unknown = b"\x00" + UNKNOWN_ID.to_bytes(4, "big") + ok[5:]
    c.refused("person", unknown, "decode", "unknown_schema_id")
    c.refused("person", b"\x00\x00\x00", "decode", "truncated_avro")
    c.refused("person", ok[:8], "decode", "truncated_avro")
    c.refused("person", ok + b"\x00\x00", "decode", "trailing_bytes")
    c.refused(
        "person",
        b"\x00" + PROTOBUF_ID.to_bytes(4, "big") + b"\x0a",
        "decode",
        "not_avro_schema",
    )
    platinum = person_record("p@x.io", nickname="P", plan="PRO", tier="PLATINUM")
    c.refused(
        "person", framed(PERSON_NEW_ID, platinum), "decode", "unknown_enum_symbol"
    )
    bad_ref = {"person_email": "badref@x.io", "address": {"city": "Oslo", "zip": None}}
    c.refused(
        "person",
        framed(PERSON_BAD_REF_ID, bad_ref),
        "decode",
        "unknown_schema_reference",
    )
    clash = framed(PERSON_CLASH_ID, {"person_email": 42})
    c.refused("person", clash, "decode", "schema_mismatch")
    for email in ("", "   ", None):
        value = framed(PERSON_ID, person_record(email, first_name="No"))
        c.refused("person", value, "validate", "missing_identifier")
    too_long = "a" * 146 + "@x.io"
    c.refused(
        "person",
        framed(PERSON_ID, person_record(too_long)),
        "validate",
        "identifier_too_long",
    )
    for fields, reason in (
        ({"first_name": "é" * 501}, "attribute_value_too_long"),
        ({"attributes": {"n" * 151: 1}}, "attribute_name_too_long"),
        ({"attributes": {f"k{i:03d}": i for i in range(301)}}, "too_many_attributes"),
        ({"score": float("nan")}, "not_finite"),
        ({"attributes": {"x": float("inf")}}, "not_finite"),
        ({"tags": ["x" * 1200]}, "attribute_value_too_long"),
        ({"created_at": 0}, "timestamp_too_small"),
        ({"created_at": -86_400}, "timestamp_too_small"),
        ({"created_at": T * 1000}, "timestamp_too_large"),
        ({"created_at": "yesterday"}, "invalid_timestamp"),
        ({"signup_ms": T}, "timestamp_too_small"),  # seconds in a milliseconds field
        ({"last_seen": datetime(1970, 1, 1, tzinfo=UTC)}, "timestamp_too_small"),
        # every broken limit is listed; the first in entry order is the reason
        (
            {"first_name": "é" * 501, "attributes": {"n" * 151: 1}},
            "attribute_name_too_long",
        ),
        (
            {"attributes": {f"f{i:02d}": "x" * 990 for i in range(33)}},
            "entry_too_large",
        ),
    ):
        value = framed(PERSON_ID, person_record("bad@x.io", **fields))
        c.refused("person", value, "validate", reason)


def build_events(c: Corpus) -> None:
    """Event records: the event topic is "auto", framed and plain mixed."""
    full = event_record(
        "Full@Example.com",
        "ev_full",
        event_id=GIVEN_ULID,
        timestamp=T,
        price=Decimal("19.99"),
        amount=2.5,
        items=[{"sku": "A-1", "qty": 2}],
        data={"coupon": "X", "n": 1, "timestamp": "kept"},
    )
    c.event(
        "full@example.com",
        framed(EVENT_ID, full),
        "ev_full",
        ExpectedEvent(
            "email:full@example.com",
            T,
            {
                "coupon": "X",
                "n": 1,
                "timestamp": "kept",
                "price": "19.99",
                "amount": 2.5,
                "items": [{"sku": "A-1", "qty": 2}],
            },
            GIVEN_ULID,
        ),
    )
    plain = event_record("plain@x.io", "ev_plain", timestamp=T, data={"k": "v"})
    c.event(
        "plain@x.io",
        encode(EVENT, plain),
        "ev_plain",
        ExpectedEvent("email:plain@x.io", T, {"k": "v"}),
    )
    # two events of one person without ids: two derived ids
    for name in ("ev_twin_1", "ev_twin_2"):
        c.event(
            "twin@x.io",
            encode(EVENT, event_record("twin@x.io", name, timestamp=T)),
            name,
            ExpectedEvent("email:twin@x.io", T, {}),
        )
    for name, timestamp in (
        ("ev_iso_zone", "2023-11-14T17:13:20-05:00"),
        ("ev_iso_naive", "2023-11-14T22:13:20"),
        ("ev_digits", "1700000000"),
    ):
        c.event(
            "ts@x.io",
            framed(EVENT_ID, event_record("ts@x.io", name, timestamp=timestamp)),
            name,
            ExpectedEvent("email:ts@x.io", T, {}),
        )
    c.event(
        "ts@x.io",
        encode(EVENT, event_record("ts@x.io", "ev_no_time")),
        "ev_no_time",
        ExpectedEvent("email:ts@x.io", None, {}),
    )
    for name in ("n" * 100, "日" * 33):  # 100 and 99 bytes
        c.event(
            "names@x.io",
            encode(EVENT, event_record("names@x.io", name, timestamp=T)),
            name,
            ExpectedEvent("email:names@x.io", T, {}),
        )
    c.event(
        "uuid@x.io",
        framed(EVENT_ID, event_record("uuid@x.io", "ev_uuid", event_id=UUID_TEXT)),
        "ev_uuid",
        ExpectedEvent("email:uuid@x.io", None, {}, UUID_AS_ULID),
    )
    old = {"person_email": "old@x.io", "event_name": "ev_old", "timestamp": T}
    c.event(
        "old@x.io",
        framed(EVENT_OLD_ID, {**old, "data": {"v": "1"}}),
        "ev_old",
        ExpectedEvent("email:old@x.io", T, {"v": "1"}),
    )
    anon = event_record("anon@x.io", "ev_with_anon", anonymous_id="cookie-1")
    c.event(
        "anon@x.io",
        framed(EVENT_ID, anon),
        "ev_with_anon",
        ExpectedEvent("email:anon@x.io", None, {"anonymous_id": "cookie-1"}),
    )
    # No person identifier but an anonymous id: sent to /api/v1/events.
    only_anon = event_record(None, "ev_anonymous", anonymous_id="cookie-2",
                             timestamp=T, data={"page": "/pricing"})  # fmt: skip
    c.event(
        "cookie-2",
        framed(EVENT_ID, only_anon),
        "ev_anonymous",
        ExpectedEvent("anonymous:cookie-2", T, {"page": "/pricing"}),
    )


def build_bad_events(c: Corpus) -> None:
    """Event records that must be refused, each with its stage and reason."""
    ok = encode(EVENT, event_record("e@x.io", "ok"))
    c.refused("event", None, "decode", "tombstone")
    c.refused("event", b"", "decode", "empty_value")
    c.refused("event", b'{"event_name": "json"}', "decode", "not_avro")
    c.refused("event", b"\xff\xff\xff", "decode", "truncated_avro")
    c.refused("event", ok + b"\x00", "decode", "trailing_bytes")
    unknown = encode_framed(UNKNOWN_ID, EVENT, event_record("e@x.io", "x"))
    c.refused("event", unknown, "decode", "unknown_schema_id")
    for record, reason in (
        (event_record("e@x.io", "n" * 101), "event_name_too_long"),
        (event_record("e@x.io", "日" * 36), "event_name_too_long"),  # 108 bytes
        (event_record("e@x.io", "  "), "missing_event_name"),
        (
            event_record(None, "anon_too_long", anonymous_id="c" * 151),
            "identifier_too_long",
        ),
        (event_record(None, "nobody"), "missing_identifier"),
        (event_record("e@x.io", "t", timestamp=T * 1000), "timestamp_too_large"),
        (event_record("e@x.io", "t", timestamp=0), "timestamp_too_small"),
        (event_record("e@x.io", "t", timestamp=-1), "timestamp_too_small"),
        (event_record("e@x.io", "t", timestamp="soon"), "invalid_timestamp"),
        (event_record("e@x.io", "t", event_id="abc-123"), "invalid_event_id"),
        (event_record("e@x.io", "t", amount=float("-inf")), "not_finite"),
        (
            event_record(
                "e@x.io", "t", data={f"d{i:03d}": "x" * 990 for i in range(102)}
            ),
            "event_data_too_large",
        ),
    ):
        c.refused("event", framed(EVENT_ID, record), "validate", reason)


def build_corpus() -> Corpus:
    corpus = Corpus()
    build_people(corpus)
    build_bad_people(corpus)
    build_events(corpus)
    build_bad_events(corpus)
    return corpus


def produce(bootstrap: str, corpus: Corpus, topics: Topics) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    names = {"person": topics.person, "event": topics.event}
    for kind, key, value in corpus.records:
        producer.produce(names[kind], key=key, value=value)
    assert producer.flush(30) == 0


@pytest.fixture
def registry() -> Iterator[RegistryStub]:
    with RegistryStub(
        REGISTRY_SCHEMAS,
        schema_types={PROTOBUF_ID: "PROTOBUF"},
        references=REFERENCES,
        subjects=SUBJECTS,
        username=REGISTRY_USER,
        password=REGISTRY_PASSWORD,
    ) as stub:
        yield stub


def test_corpus_every_record_delivered_as_expected_or_dead_lettered(
    archive_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
    registry: RegistryStub,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each corpus record reaches the API exactly as expected or is dead-lettered
    with its stage and reason, and archived to S3; the worker reads to the end
    and commits it all."""
    corpus = build_corpus()
    assert len(corpus.records) >= 60
    produce(kafka_bootstrap, corpus, topics)
    for name, value in {
        "CIO_SCHEMAS__PERSON": str(SCHEMA_DIR / "corpus_person.avsc"),
        "CIO_SCHEMAS__EVENT": str(SCHEMA_DIR / "corpus_event.avsc"),
        "CIO_SCHEMAS__PERSON_FORMAT": "confluent",
        "CIO_SCHEMAS__EVENT_FORMAT": "auto",
        "CIO_SCHEMAS__REGISTRY_URL": registry.url,
        "CIO_SCHEMAS__REGISTRY_USERNAME": REGISTRY_USER,
        "CIO_SCHEMAS__REGISTRY_PASSWORD": REGISTRY_PASSWORD,
        "CIO_MAPPING__PERSON_TOMBSTONES": "delete",
    }.items():
        monkeypatch.setenv(name, value)

    counters = Worker(load_settings(), until_caught_up=True).run()

    people = simulator.people()
    expected_people = dict(corpus.people)
    for event in corpus.events.values():  # an event creates its person
        if not event.person.startswith("anonymous:"):  # an anonymous one does not
            expected_people.setdefault(event.person, {})
    assert people == expected_people
    assert not corpus.gone & set(people)
    assert_events(simulator.events(), corpus)
    assert_dead_letters(read_all(kafka_bootstrap, topics.dead_letter), corpus)
    worker_requests = list(registry.requests)
    Archiver(load_settings(), until_caught_up=True).run()
    assert_archived(read_archive(s3_endpoint, s3_bucket), corpus)

    assert counters.consumed == len(corpus.records)
    assert counters.rejected == len(corpus.dead)
    assert counters.delivered + counters.rejected + counters.skipped == len(
        corpus.records
    )
    # basic auth accepted; each id and reference asked once, the unknown ones
    # answered 404
    asked = dict(worker_requests)
    assert len(asked) == len(worker_requests)
    assert asked.pop(f"/schemas/ids/{UNKNOWN_ID}") == 404
    assert asked.pop("/subjects/deleted-subject/versions/4") == 404
    assert asked.pop(f"/subjects/{ADDRESS_SUBJECT}/versions/1") == 200
    assert set(asked.values()) == {200}
    for topic in (topics.person, topics.event):
        assert committed_offsets(kafka_bootstrap, topics.group, topic) == end_offsets(
            kafka_bootstrap, topic
        )

    # A replay (a new group reads the same records) sends the same event ids.
    events_before = simulator.events()
    monkeypatch.setenv("CIO_KAFKA__GROUP_ID", topics.group + "-replay")
    Worker(load_settings(), until_caught_up=True).run()
    assert simulator.events() == events_before
    assert simulator.people() == people


def assert_archived(objects: dict[str, list[Any]], corpus: Corpus) -> None:
    """Every dead letter is one archive line with its original bytes, reason and
    source coordinates."""
    values = {key: value for _, key, value in corpus.records}
    lines = [line for key in sorted(objects) for line in objects[key]]
    got: dict[bytes | None, tuple[str, str]] = {}
    for line in lines:
        key = None if line["key"] is None else base64.b64decode(line["key"])
        got[key] = (line["reject"]["stage"], line["reject"]["reason"])
        value = None if line["value"] is None else base64.b64decode(line["value"])
        assert value == values[key], key
        assert line["source"]["offset"] is not None, key
        assert line["fragment"] is None, key
    assert got == corpus.dead
    assert len(lines) == len(corpus.dead)


def assert_events(events: list[Any], corpus: Corpus) -> None:
    """The simulator holds exactly the expected events, with the expected ids."""
    by_name = {event["name"]: event for event in events}
    assert len(by_name) == len(events) == len(corpus.events)
    for name, expected in corpus.events.items():
        got = by_name[name]
        assert got["person"] == expected.person, name
        assert got["timestamp"] == expected.timestamp, name
        assert got["attributes"] == expected.attributes, name
        assert _ULID.fullmatch(got["id"]), name
        if expected.event_id is not None:
            assert got["id"] == expected.event_id, name
    assert by_name["ev_twin_1"]["id"] != by_name["ev_twin_2"]["id"]
    assert len({event["id"] for event in events}) == len(events)


def assert_dead_letters(dead: list[Any], corpus: Corpus) -> None:
    """Every refused record, and only those, with its stage, reason and origin."""
    got: dict[bytes | None, tuple[str, str]] = {}
    values = {key: value for _, key, value in corpus.records}
    for message in dead:
        headers = header_map(message.headers())
        got[message.key()] = (headers["stage"], headers["reason"])
        assert headers["message"], message.key()
        assert message.value() == values[message.key()]
    assert got == corpus.dead
    assert len(dead) == len(corpus.dead)


def test_corpus_identity_by_id_and_tombstone_policies(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """People identified by id on plain topics; a tombstone is ignored (counted as
    skipped) or suppresses the person its key names."""
    records: list[tuple[str, bytes | None, bytes | None]] = []
    for person_id in ("u-1", "u-2", "u-3"):
        person = person_record(None, person_id=person_id, first_name=person_id)
        records.append(("person", person_id.encode(), encode(PERSON, person)))
    records.append(("person", b"u-4", encode(PERSON, person_record(None, person_id=4))))
    records.append(("person", b"u-2", None))  # ignored: u-2 stays
    event = event_record(None, "ev_by_id", person_id="u-1", timestamp=T)
    records.append(("event", b"u-1", encode(EVENT, event)))
    no_id = event_record("only-email@x.io", "ev_no_id")
    records.append(("event", b"x", encode(EVENT, no_id)))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for kind, key, value in records:
        producer.produce(getattr(topics, kind), key=key, value=value)
    assert producer.flush(30) == 0
    for name, value in {
        "CIO_SCHEMAS__PERSON": str(SCHEMA_DIR / "corpus_person.avsc"),
        "CIO_SCHEMAS__EVENT": str(SCHEMA_DIR / "corpus_event.avsc"),
        "CIO_MAPPING__PERSON_IDENTIFIER": "id",
        "CIO_MAPPING__PERSON_IDENTIFIER_FIELD": "person_id",
        "CIO_MAPPING__EVENT_IDENTIFIER": "id",
        "CIO_MAPPING__EVENT_IDENTIFIER_FIELD": "person_id",
    }.items():
        monkeypatch.setenv(name, value)

    counters = Worker(load_settings(), until_caught_up=True).run()

    assert simulator.people() == {
        "id:u-1": {"first_name": "u-1"},
        "id:u-2": {"first_name": "u-2"},
        "id:u-3": {"first_name": "u-3"},
        "id:4": {},
    }
    [event_sent] = simulator.events()
    assert (event_sent["person"], event_sent["name"]) == ("id:u-1", "ev_by_id")
    dead = read_all(kafka_bootstrap, topics.dead_letter)
    assert [header_map(m.headers())["reason"] for m in dead] == ["missing_identifier"]
    assert counters.skipped == 1
    assert counters.delivered + counters.rejected + counters.skipped == len(records)

    # Now suppress: the person its key names is removed and blocked.
    suppress_group = topics.group + "-suppress"
    monkeypatch.setenv("CIO_KAFKA__GROUP_ID", suppress_group)
    monkeypatch.setenv("CIO_MAPPING__PERSON_TOMBSTONES", "suppress")
    simulator.reset()

    Worker(load_settings(), until_caught_up=True).run()

    assert "id:u-2" not in simulator.people()
    assert simulator.snapshot()["suppressed"] == ["id:u-2"]
