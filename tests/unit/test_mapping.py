"""Unit tests of worker.mapping: records to Track API entries, ids, JSON."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from worker.errors import ValidationError
from worker.mapping import (
    Coordinates,
    derive_event_id,
    serialize,
    to_event,
    to_identify,
)

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
COORDS = Coordinates("person-events", 2, 41, 1_700_000_000_123)


def ulid_millis(value: str) -> int:
    """The 48-bit time part of a ULID string, decoded without the ulid package."""
    number = 0
    for char in value[:10]:
        number = number * 32 + CROCKFORD.index(char)
    return number


def test_to_identify_full_record_builds_identify_entry() -> None:
    """A person record becomes an identify entry keyed by email."""
    record = {
        "person_email": "ann@example.com",
        "first_name": "Ann",
        "created_at": 1_700_000_000,
        "lifetime_value": 12.5,
        "is_active": True,
        "attributes": {"tier": "gold"},
    }

    entry = to_identify(record)

    assert entry == {
        "type": "person",
        "action": "identify",
        "identifiers": {"email": "ann@example.com"},
        "attributes": {
            "first_name": "Ann",
            "created_at": 1_700_000_000,
            "lifetime_value": 12.5,
            "is_active": True,
            "tier": "gold",
        },
    }


def test_to_identify_null_fields_are_omitted() -> None:
    """Null fields and null map values are left out, never sent as null."""
    record = {
        "person_email": "ann@example.com",
        "first_name": None,
        "plan": "pro",
        "is_active": False,
        "attributes": {"nickname": None, "score": 0},
    }

    entry = to_identify(record)

    assert entry["attributes"] == {"plan": "pro", "is_active": False, "score": 0}


def test_to_identify_named_field_wins_over_map_key() -> None:
    """A named field overrides a map key of the same name."""
    record = {
        "person_email": "ann@example.com",
        "plan": "pro",
        "attributes": {"plan": "free", "color": "blue"},
    }

    entry = to_identify(record)

    assert entry["attributes"] == {"plan": "pro", "color": "blue"}


def test_to_identify_email_is_not_an_attribute() -> None:
    """The identifying email appears only in identifiers."""
    record = {"person_email": "ann@example.com", "plan": "pro"}

    entry = to_identify(record)

    assert "person_email" not in entry["attributes"]
    assert entry["identifiers"] == {"email": "ann@example.com"}


@pytest.mark.parametrize("kind", ["identify", "event"])
def test_collect_map_key_person_email_is_not_an_attribute(kind: str) -> None:
    """A person_email key inside the free-form map is never sent as an attribute."""
    if kind == "identify":
        record = {"person_email": "a@x.io", "attributes": {"person_email": "b@x.io"}}
    else:
        record = {
            "person_email": "a@x.io",
            "event_name": "signed_up",
            "data": {"person_email": "b@x.io"},
        }

    entry = to_identify(record) if kind == "identify" else to_event(record, COORDS)

    assert "person_email" not in entry["attributes"]


def test_to_event_full_record_builds_event_entry() -> None:
    """An event record becomes an event entry with name, id, timestamp and data."""
    record = {
        "person_email": "ann@example.com",
        "event_name": "purchase",
        "event_id": "01HGW1Z9K2X3Y4Z5A6B7C8D9E0",
        "timestamp": 1_700_000_000,
        "value": 9.99,
        "currency": None,
        "data": {"sku": "A-1", "value": 1.0},
    }

    entry = to_event(record, COORDS)

    assert entry == {
        "type": "person",
        "action": "event",
        "identifiers": {"email": "ann@example.com"},
        "name": "purchase",
        "id": "01HGW1Z9K2X3Y4Z5A6B7C8D9E0",
        "timestamp": 1_700_000_000,
        "attributes": {"sku": "A-1", "value": 9.99},
    }


def test_to_event_without_timestamp_omits_timestamp() -> None:
    """An event with a null timestamp sends no timestamp key."""
    record = {"person_email": "a@x.io", "event_name": "login", "timestamp": None}

    entry = to_event(record, COORDS)

    assert "timestamp" not in entry
    assert entry["attributes"] == {}


def test_to_event_without_event_id_uses_derived_id() -> None:
    """An event without an id gets the id derived from its coordinates."""
    record = {"person_email": "a@x.io", "event_name": "login", "event_id": None}

    entry = to_event(record, COORDS)

    assert entry["id"] == derive_event_id(COORDS)
    assert ulid_millis(entry["id"]) == COORDS.timestamp_ms


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        ({}, "missing_identifier", "person_email"),
        ({"person_email": None}, "missing_identifier", "person_email"),
        ({"person_email": ""}, "missing_identifier", "person_email"),
        ({"person_email": "   "}, "missing_identifier", "person_email"),
        ({"person_email": 42}, "missing_identifier", "person_email"),
    ],
)
def test_to_identify_bad_email_raises_validation_error(
    record: dict[str, Any], reason: str, field: str
) -> None:
    """A person without a usable email is refused naming person_email."""
    with pytest.raises(ValidationError) as caught:
        to_identify(record)

    assert caught.value.reason == reason
    assert caught.value.field == field
    assert caught.value.stage == "validate"


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        ({"event_name": "login"}, "missing_identifier", "person_email"),
        ({"person_email": " ", "event_name": "login"}, "missing_identifier",
         "person_email"),
        ({"person_email": "a@x.io"}, "missing_event_name", "event_name"),
        ({"person_email": "a@x.io", "event_name": ""}, "missing_event_name",
         "event_name"),
        ({"person_email": "a@x.io", "event_name": " \t"}, "missing_event_name",
         "event_name"),
    ],
)  # fmt: skip
def test_to_event_bad_record_raises_validation_error(
    record: dict[str, Any], reason: str, field: str
) -> None:
    """An event without an email or a name is refused with the field at fault."""
    with pytest.raises(ValidationError) as caught:
        to_event(record, COORDS)

    assert caught.value.reason == reason
    assert caught.value.field == field


def test_derive_event_id_is_a_valid_ulid() -> None:
    """The derived id is 26 Crockford base32 characters that fit in 128 bits."""
    event_id = derive_event_id(COORDS)

    assert len(event_id) == 26
    assert set(event_id) <= set(CROCKFORD)
    assert event_id[0] in "01234567"


@pytest.mark.parametrize("timestamp_ms", [0, 1, 1_700_000_000_123, 2**48 - 1])
def test_derive_event_id_time_part_is_kafka_timestamp(timestamp_ms: int) -> None:
    """The id's time part equals the record's Kafka timestamp in milliseconds."""
    coords = Coordinates("t", 0, 0, timestamp_ms)

    event_id = derive_event_id(coords)

    assert ulid_millis(event_id) == timestamp_ms


def test_derive_event_id_negative_timestamp_uses_zero_time() -> None:
    """A missing (-1) Kafka timestamp gives a time part of zero, not an error."""
    coords = Coordinates("t", 0, 0, -1)

    event_id = derive_event_id(coords)

    assert ulid_millis(event_id) == 0


def test_derive_event_id_same_coordinates_same_id() -> None:
    """Re-deriving from equal coordinates gives the same id."""
    again = Coordinates(
        COORDS.topic, COORDS.partition, COORDS.offset, COORDS.timestamp_ms
    )

    first, second = derive_event_id(COORDS), derive_event_id(again)

    assert first == second


@pytest.mark.parametrize(
    "other",
    [
        Coordinates("person-events", 2, 42, 1_700_000_000_123),
        Coordinates("person-events", 3, 41, 1_700_000_000_123),
        Coordinates("other-events", 2, 41, 1_700_000_000_123),
        Coordinates("person-events", 24, 1, 1_700_000_000_123),
    ],
)
def test_derive_event_id_other_coordinates_other_random_part(
    other: Coordinates,
) -> None:
    """A different offset, partition or topic changes the id's random part."""
    ours = derive_event_id(COORDS)

    theirs = derive_event_id(other)

    assert ours[10:] != theirs[10:]


def test_to_event_given_event_id_is_kept() -> None:
    """An event that carries its own id is sent with that id."""
    record = {"person_email": "a@x.io", "event_name": "login", "event_id": "abc-123"}

    entry = to_event(record, COORDS)

    assert entry["id"] == "abc-123"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_serialize_not_finite_raises_validation_error(bad: float) -> None:
    """NaN and infinities are refused with reason not_finite."""
    entry = {"attributes": {"value": bad}}

    with pytest.raises(ValidationError) as caught:
        serialize(entry)

    assert caught.value.reason == "not_finite"


def test_serialize_non_ascii_kept_as_utf8() -> None:
    """Non-ASCII text is written as UTF-8, not as \\u escapes."""
    entry = {"name": "café ☕"}

    data = serialize(entry)

    assert data == '{"name":"café ☕"}'.encode()
    assert len(data) == 17 + 1 + 2  # 17 characters; é takes 2 bytes, ☕ takes 3
    assert json.loads(data) == entry


def test_serialize_is_compact() -> None:
    """Entries are written without spaces after separators."""
    entry = {"a": [1, 2], "b": {"c": True}}

    data = serialize(entry)

    assert data == b'{"a":[1,2],"b":{"c":true}}'
