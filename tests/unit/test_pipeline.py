"""Unit tests of worker.pipeline.to_item: one message to one batch item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.unit.fakes import FakeMessage
from worker.avro import AvroDecoder, encode, load_schema
from worker.mapping import Coordinates, derive_event_id, serialize, to_identify
from worker.pipeline import Kind, TopicRoute, to_item

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def person_schema() -> Any:
    return load_schema(ROOT / "schemas" / "person.avsc")


@pytest.fixture(scope="module")
def event_schema() -> Any:
    return load_schema(ROOT / "schemas" / "person_event.avsc")


@pytest.fixture(scope="module")
def person_route(person_schema: Any) -> TopicRoute:
    return TopicRoute(Kind.PERSON, AvroDecoder(person_schema))


@pytest.fixture(scope="module")
def event_route(event_schema: Any) -> TopicRoute:
    return TopicRoute(Kind.EVENT, AvroDecoder(event_schema))


def test_to_item_person_record_becomes_identify_entry(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """A person record becomes an item carrying its identify entry bytes."""
    value = encode(person_schema, {"person_email": "ann@example.com", "plan": "pro"})
    message = FakeMessage(value, offset_number=17)

    item = to_item(message, person_route)

    assert item.reject is None
    assert item.offset == 17
    assert item.message is message
    assert item.entry == (
        b'{"type":"person","action":"identify",'
        b'"identifiers":{"email":"ann@example.com"},"attributes":{"plan":"pro"}}'
    )


def test_to_item_event_without_id_gets_derived_id(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event without event_id is sent with the id derived from its coordinates."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": "login"})
    message = FakeMessage(
        value,
        topic_name="person-events",
        partition_number=5,
        offset_number=99,
        timestamp_ms=1_700_000_000_777,
    )

    item = to_item(message, event_route)

    assert item.entry is not None
    entry = json.loads(item.entry)
    expected_id = derive_event_id(
        Coordinates("person-events", 5, 99, 1_700_000_000_777)
    )
    assert entry == {
        "type": "person",
        "action": "event",
        "identifiers": {"email": "a@x.io"},
        "name": "login",
        "id": expected_id,
        "attributes": {},
    }


def test_to_item_same_event_twice_same_id(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """Replaying the same event record produces the same entry bytes."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": "login"})

    first = to_item(FakeMessage(value, topic_name="e", offset_number=3), event_route)
    second = to_item(FakeMessage(value, topic_name="e", offset_number=3), event_route)
    other = to_item(FakeMessage(value, topic_name="e", offset_number=4), event_route)

    assert first.entry == second.entry
    assert first.entry != other.entry


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x02", "truncated_avro"),  # a 1-byte string with no byte after it
        (b"\x06a@x\x14", "bad_avro"),  # union branch 10 of a two-branch union
        (b"", "empty_value"),
    ],
)
def test_to_item_bad_bytes_reject_stage_decode(
    person_route: TopicRoute, value: bytes | None, reason: str
) -> None:
    """Bytes that do not decode become a reject at stage decode, not an error."""
    message = FakeMessage(value, offset_number=8)

    with capture_logs() as logs:
        item = to_item(message, person_route)

    assert item.entry is None
    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("decode", reason)
    assert item.offset == 8
    assert logs == [
        {
            "event": "record_rejected",
            "log_level": "debug",
            "topic": "persons",
            "partition": 0,
            "offset": 8,
            "stage": "decode",
            "reason": reason,
        }
    ]


@pytest.mark.parametrize("email", ["", "   "])
def test_to_item_blank_email_reject_stage_validate(
    person_schema: Any, person_route: TopicRoute, email: str
) -> None:
    """A person with a blank email becomes a validate reject naming the field."""
    value = encode(person_schema, {"person_email": email, "plan": "pro"})

    item = to_item(FakeMessage(value), person_route)

    assert item.entry is None
    assert item.reject is not None
    assert item.reject.stage == "validate"
    assert item.reject.reason == "missing_identifier"
    assert item.reject.field == "person_email"


def test_to_item_blank_event_name_reject_stage_validate(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event with a blank name becomes a validate reject naming event_name."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": " "})

    item = to_item(FakeMessage(value, topic_name="person-events"), event_route)

    assert item.reject is not None
    assert (item.reject.reason, item.reject.field) == (
        "missing_event_name",
        "event_name",
    )


def test_to_item_nan_value_reject_not_finite(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event whose value is NaN is rejected rather than sent as invalid JSON."""
    value = encode(
        event_schema,
        {"person_email": "a@x.io", "event_name": "buy", "value": float("nan")},
    )

    item = to_item(FakeMessage(value, topic_name="person-events"), event_route)

    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("validate", "not_finite")


def person_of_entry_size(schema: Any, size: int) -> bytes:
    """A person whose identify entry is exactly ``size`` bytes, its text spread
    over map attributes of at most 1,000 bytes (the attribute value limit)."""
    empty = {"person_email": "a@x.io", "attributes": {}}
    remaining = len(serialize(to_identify(empty)))
    attributes: dict[str, str] = {}
    while remaining < size:
        key = f"f{len(attributes):03d}"
        overhead = len(f'"{key}":""') + (1 if attributes else 0)
        room = size - remaining - overhead
        chunk = 1000 if room > 1000 + 40 else room
        attributes[key] = "x" * chunk
        remaining += overhead + chunk
    record = {"person_email": "a@x.io", "attributes": attributes}
    assert len(serialize(to_identify(record))) == size
    return encode(schema, record)


def test_to_item_entry_at_limit_is_sent(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """An entry of exactly 32,000 bytes is carried as an entry."""
    value = person_of_entry_size(person_schema, 32_000)

    item = to_item(FakeMessage(value), person_route)

    assert item.reject is None
    assert item.entry is not None
    assert len(item.entry) == 32_000


def test_to_item_entry_over_limit_reject_entry_too_large(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """An entry of 32,001 bytes is rejected at stage validate as entry_too_large."""
    value = person_of_entry_size(person_schema, 32_001)

    item = to_item(FakeMessage(value), person_route)

    assert item.entry is None
    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("validate", "entry_too_large")
