"""Unit tests of worker.mapping: records to Track API entries, ids, JSON."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from fastavro import parse_schema

from worker.errors import ConfigError, ValidationError
from worker.mapping import (
    Coordinates,
    RecordShape,
    TopicMapping,
    anonymous_body,
    derive_event_id,
    is_anonymous,
    serialize,
    to_event,
    to_identify,
    to_json,
    to_person_action,
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


# -- identity, flattening, JSON conversion and timestamps --------------------------

T = 1_700_000_000


def shape_of(*fields: dict[str, Any]) -> RecordShape:
    """The shape of a record schema with these fields."""
    schema = {"type": "record", "name": "R", "fields": list(fields)}
    return RecordShape.of(parse_schema(schema))


ADDRESS = {
    "type": "record",
    "name": "Address",
    "fields": [
        {"name": "city", "type": "string"},
        {"name": "zip", "type": ["null", "string"], "default": None},
        {
            "name": "geo",
            "type": [
                "null",
                {
                    "type": "record",
                    "name": "Geo",
                    "fields": [
                        {"name": "lat", "type": "double"},
                        {"name": "lon", "type": "double"},
                    ],
                },
            ],
            "default": None,
        },
    ],
}
SHAPE = shape_of(
    {"name": "person_email", "type": "string"},
    {"name": "address", "type": ["null", ADDRESS], "default": None},
    {"name": "billing", "type": ["null", "Address"], "default": None},
    {"name": "seen_ms", "type": ["null", "long"], "cio.timestamp": "milliseconds"},
    {"name": "renewed", "type": ["null", "string"], "cio.timestamp": "seconds"},
    {"name": "tags", "type": {"type": "map", "values": "string"}},
)


@pytest.mark.parametrize(
    ("identifier_type", "field", "record", "expected"),
    [
        ("email", "person_email", {"person_email": "A@x.io"}, {"email": "A@x.io"}),
        ("id", "person_id", {"person_id": "u-42"}, {"id": "u-42"}),
        ("id", "person_id", {"person_id": 42}, {"id": "42"}),
        ("cio_id", "cio_id", {"cio_id": "a3000001"}, {"cio_id": "a3000001"}),
        (
            "email",
            "contact",
            {"contact": "b@x.io", "person_email": "no"},
            {"email": "b@x.io"},
        ),
    ],
)
def test_to_identify_identifier_type_and_field_from_mapping(
    identifier_type: Any, field: str, record: dict[str, Any], expected: Any
) -> None:
    """The identifier is read from the configured field as the configured type."""
    mapping = TopicMapping(identifier_type, field)

    entry = to_identify(record, mapping)

    assert entry["identifiers"] == expected
    assert field not in entry["attributes"]


@pytest.mark.parametrize(
    ("identifier_type", "value"),
    [("id", True), ("id", 4.2), ("email", 42), ("cio_id", 7), ("id", ""), ("id", None)],
)
def test_to_identify_unusable_identifier_raises_missing_identifier(
    identifier_type: Any, value: Any
) -> None:
    """Only text (and an integer for id) identifies a person."""
    mapping = TopicMapping(identifier_type, "who")

    with pytest.raises(ValidationError) as caught:
        to_identify({"who": value}, mapping)

    assert (caught.value.reason, caught.value.field) == ("missing_identifier", "who")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"event_name": "view", "anonymous_id": "anon-1"},
            {"type": "person", "action": "event", "anonymous_id": "anon-1",
             "name": "view", "id": derive_event_id(COORDS), "attributes": {}},
        ),
        (
            {"person_email": None, "event_name": "view", "anonymous_id": "anon-1",
             "event_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "timestamp": 1700000000,
             "data": {"page": "/pricing"}},
            {"type": "person", "action": "event", "anonymous_id": "anon-1",
             "name": "view", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
             "attributes": {"page": "/pricing"}, "timestamp": 1700000000},
        ),
    ],
)  # fmt: skip
def test_to_event_anonymous_event_carries_anonymous_id(
    record: dict[str, Any], expected: dict[str, Any]
) -> None:
    """An event with no person but an anonymous id is an anonymous event."""
    entry = to_event(record, COORDS)

    assert entry == expected
    assert is_anonymous(serialize(entry))


def test_to_event_blank_anonymous_id_is_missing_identifier() -> None:
    """A blank anonymous id does not make an event anonymous."""
    record = {"event_name": "view", "anonymous_id": " "}

    with pytest.raises(ValidationError) as caught:
        to_event(record, COORDS)

    assert (caught.value.reason, caught.value.field) == (
        "missing_identifier",
        "person_email",
    )


@pytest.mark.parametrize(
    ("entry", "anonymous"),
    [
        ({"type": "person", "action": "event", "anonymous_id": "a", "name": "n",
          "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "attributes": {}}, True),
        ({"type": "person", "action": "event", "identifiers": {"email": "a@x.io"},
          "name": "n", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV",
          "attributes": {"anonymous_id": "a"}}, False),
        ({"type": "person", "action": "identify", "identifiers": {"id": "7"},
          "attributes": {"anonymous_id": "a"}}, False),
    ],
)  # fmt: skip
def test_is_anonymous_by_entry_shape(entry: dict[str, Any], anonymous: bool) -> None:
    """Only an anonymous event's entry is sent to the v1 anonymous endpoint."""
    assert is_anonymous(serialize(entry)) is anonymous


def test_anonymous_body_is_the_v1_event_shape() -> None:
    """The v1 body says ``data`` for the event data and drops type and action."""
    record = {"event_name": "view", "anonymous_id": "anon-1", "timestamp": 1700000000,
              "data": {"page": "/pricing", "ünï": "çødé"}}  # fmt: skip

    body = json.loads(anonymous_body(serialize(to_event(record, COORDS))))

    assert body == {
        "anonymous_id": "anon-1",
        "name": "view",
        "id": derive_event_id(COORDS),
        "timestamp": 1700000000,
        "data": {"page": "/pricing", "ünï": "çødé"},
    }


def test_to_event_identified_with_anonymous_id_keeps_it_as_data() -> None:
    """An event with a person and an anonymous id is sent, the id as data."""
    record = {"person_email": "a@x.io", "event_name": "view", "anonymous_id": "c1"}

    entry = to_event(record, COORDS)

    assert entry["identifiers"] == {"email": "a@x.io"}
    assert entry["attributes"] == {"anonymous_id": "c1"}


def test_to_identify_nested_records_flattened_with_dots() -> None:
    """Record fields become dotted attributes; maps and arrays stay JSON."""
    record = {
        "person_email": "a@x.io",
        "address": {"city": "Oslo", "zip": None, "geo": {"lat": 59.9, "lon": 10.7}},
        "billing": {"city": "Bergen", "zip": "5003", "geo": None},
        "tags": {"a": "1", "b": "2"},
        "langs": ["no", "en"],
        "orders": [{"id": 1, "lines": [{"sku": "x"}]}],
        "attributes": {"address.city": "from map", "vip": True},
    }

    entry = to_identify(record, TopicMapping(shape=SHAPE))

    assert entry["attributes"] == {
        "address.city": "Oslo",
        "address.geo.lat": 59.9,
        "address.geo.lon": 10.7,
        "billing.city": "Bergen",
        "billing.zip": "5003",
        "tags": {"a": "1", "b": "2"},
        "langs": ["no", "en"],
        "orders": [{"id": 1, "lines": [{"sku": "x"}]}],
        "vip": True,
    }


def test_to_identify_record_without_shape_kept_as_object() -> None:
    """Without a schema saying it is a record, a nested dict stays an object."""
    record = {"person_email": "a@x.io", "address": {"city": "Oslo", "zip": None}}

    entry = to_identify(record)

    assert entry["attributes"] == {"address": {"city": "Oslo", "zip": None}}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", ""),
        (0, 0),
        (False, False),
        (1.5, 1.5),
        (Decimal("12.30"), "12.30"),
        (Decimal("-0.001"), "-0.001"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("12345678901234567890.12"), "12345678901234567890.12"),
        (Decimal("1E+3"), "1000"),
        (date(2024, 2, 29), "2024-02-29"),
        (time(13, 45, 1, 250000), "13:45:01.250000"),
        (time(13, 45), "13:45:00"),
        (
            UUID("6B30FA27-9E05-4818-8E68-A9E194DDC832"),
            "6b30fa27-9e05-4818-8e68-a9e194ddc832",
        ),
        (b"\x00\xffhi", "AP9oaQ=="),
        (bytearray(b"AB"), "QUI="),
        (b"", ""),
        (datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC), T),
        (datetime(2023, 11, 14, 22, 13, 20), T),
        ([Decimal("1.0"), b"\x01", None], ["1.0", "AQ==", None]),
        ({"k": date(2020, 1, 1), "n": None}, {"k": "2020-01-01", "n": None}),
    ],
)
def test_to_json_converts_avro_values_by_one_rule(value: Any, expected: Any) -> None:
    """Each Avro value type has one JSON form."""
    assert to_json(value, "f") == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_to_json_non_finite_float_left_for_limits(value: float) -> None:
    """to_json passes a NaN on so that limits report it beside every other problem."""
    converted = to_json(value, "f")

    assert converted is value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), "timestamp_too_small"),
        (object(), "unsupported_value"),
    ],
)
def test_to_json_unconvertible_value_raises(value: Any, reason: str) -> None:
    """A timestamp out of range or an unknown type is refused naming the field."""
    with pytest.raises(ValidationError) as caught:
        to_json(value, "orders[0].at")

    assert (caught.value.reason, caught.value.field) == (reason, "orders[0].at")


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (T, T),
        (float(T), T),
        ("2023-11-14T22:13:20Z", T),
        ("2023-11-14T23:13:20+01:00", T),
        ("2023-11-14T22:13:20", T),
        (str(T), T),
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), T),
    ],
)
def test_to_event_timestamp_normalised_to_seconds(
    timestamp: Any, expected: int
) -> None:
    """Seconds, ISO text with or without a zone and datetimes become seconds."""
    record = {"person_email": "a@x.io", "event_name": "e", "timestamp": timestamp}

    entry = to_event(record, COORDS)

    assert entry["timestamp"] == expected


@pytest.mark.parametrize(
    ("timestamp", "reason"),
    [
        (T * 1000, "timestamp_too_large"),
        (0, "timestamp_too_small"),
        (-5, "timestamp_too_small"),
        ("next tuesday", "invalid_timestamp"),
        (math.nan, "invalid_timestamp"),
    ],
)
def test_to_event_bad_timestamp_rejected_not_replaced(
    timestamp: Any, reason: str
) -> None:
    """A timestamp that is unreadable or implausible is refused, never set to now."""
    record = {"person_email": "a@x.io", "event_name": "e", "timestamp": timestamp}

    with pytest.raises(ValidationError) as caught:
        to_event(record, COORDS)

    assert (caught.value.reason, caught.value.field) == (reason, "timestamp")


def test_to_event_timestamp_marked_milliseconds_converted() -> None:
    """A timestamp field the schema marks as milliseconds is divided to seconds."""
    shape = shape_of(
        {"name": "timestamp", "type": "long", "cio.timestamp": "milliseconds"}
    )
    record = {"person_email": "a@x.io", "event_name": "e", "timestamp": T * 1000 + 5}

    entry = to_event(record, COORDS, TopicMapping(shape=shape))

    assert entry["timestamp"] == T


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"created_at": T}, {"created_at": T}),
        ({"created_at": "2023-11-14T22:13:20Z"}, {"created_at": T}),
        ({"attributes": {"created_at": "2023-11-14T22:13:20Z"}}, {"created_at": T}),
        (
            {"created_at": datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)},
            {"created_at": T},
        ),
        ({"seen_ms": T * 1000 + 999}, {"seen_ms": T}),
        ({"renewed": "2023-11-14"}, {"renewed": T - 80_000}),
        (
            {"address": {"city": "x", "geo": None}, "seen_ms": None},
            {"address.city": "x"},
        ),
        ({"updated": "2023-11-14"}, {"updated": "2023-11-14"}),  # not a timestamp
    ],
)
def test_to_identify_timestamp_attributes_normalised(
    record: dict[str, Any], expected: dict[str, Any]
) -> None:
    """created_at and marked fields become seconds; others are left alone."""
    entry = to_identify({"person_email": "a@x.io", **record}, TopicMapping(shape=SHAPE))

    assert entry["attributes"] == expected


@pytest.mark.parametrize(
    ("record", "reason", "field"),
    [
        ({"created_at": 0}, "timestamp_too_small", "created_at"),
        ({"created_at": -1}, "timestamp_too_small", "created_at"),
        ({"created_at": T * 1000}, "timestamp_too_large", "created_at"),
        ({"attributes": {"created_at": "soon"}}, "invalid_timestamp", "created_at"),
        ({"seen_ms": 5}, "timestamp_too_small", "seen_ms"),
        ({"renewed": "later"}, "invalid_timestamp", "renewed"),
    ],
)
def test_to_identify_bad_timestamp_attribute_rejected(
    record: dict[str, Any], reason: str, field: str
) -> None:
    """A person timestamp attribute out of range or unreadable refuses the record."""
    with pytest.raises(ValidationError) as caught:
        to_identify({"person_email": "a@x.io", **record}, TopicMapping(shape=SHAPE))

    assert (caught.value.reason, caught.value.field) == (reason, field)


def test_to_event_two_events_without_id_get_distinct_ids() -> None:
    """Two id-less events of one person, at two offsets, get two ids."""
    record = {"person_email": "a@x.io", "event_name": "login"}

    first = to_event(record, Coordinates("e", 0, 10, 1_700_000_000_000))
    second = to_event(record, Coordinates("e", 0, 11, 1_700_000_000_000))

    assert first["id"] != second["id"]


def test_to_event_replayed_record_gets_same_id() -> None:
    """The same record read again (same coordinates) gets the same id."""
    record = {"person_email": "a@x.io", "event_name": "login"}

    first = to_event(record, Coordinates("e", 0, 10, 1_700_000_000_000))
    replay = to_event(dict(record), Coordinates("e", 0, 10, 1_700_000_000_000))

    assert first["id"] == replay["id"]


@pytest.mark.parametrize(
    "given",
    [
        UUID("6b30fa27-9e05-4818-8e68-a9e194ddc832"),
        "6b30fa27-9e05-4818-8e68-a9e194ddc832",
        "6B30FA27-9E05-4818-8E68-A9E194DDC832",
    ],
)
def test_to_event_uuid_event_id_becomes_ulid_of_same_bits(given: Any) -> None:
    """A UUID event id is re-encoded as the ULID of its 128 bits."""
    record = {"person_email": "a@x.io", "event_name": "e", "event_id": given}

    entry = to_event(record, COORDS)

    assert entry["id"] == "3B63X2F7G590C8WT59W6ADVJ1J"


def test_to_event_data_map_keeps_keys_named_like_entry_fields() -> None:
    """Only the identifier is dropped from the map; other keys are event data."""
    record = {
        "person_email": "a@x.io",
        "event_name": "e",
        "data": {"person_email": "x", "timestamp": "t", "event_name": "n"},
    }

    entry = to_event(record, COORDS)

    assert entry["attributes"] == {"timestamp": "t", "event_name": "n"}


@pytest.mark.parametrize(
    ("action", "key", "mapping", "identifiers"),
    [
        ("delete", b"a@x.io", TopicMapping(), {"email": "a@x.io"}),
        ("suppress", b"a@x.io", TopicMapping(), {"email": "a@x.io"}),
        ("delete", b"u-42", TopicMapping("id", "person_id"), {"id": "u-42"}),
        ("suppress", "é@x.io".encode(), TopicMapping(), {"email": "é@x.io"}),
    ],
)
def test_to_person_action_names_person_by_key(
    action: str, key: bytes, mapping: TopicMapping, identifiers: dict[str, str]
) -> None:
    """A tombstone's key becomes the identifier of a delete or suppress entry."""
    entry = to_person_action(key, action, mapping)

    assert entry == {"type": "person", "action": action, "identifiers": identifiers}


@pytest.mark.parametrize("key", [None, b"", b"  ", b"\xff\xfe"])
def test_to_person_action_without_usable_key_raises(key: bytes | None) -> None:
    """A tombstone without a UTF-8 key names no person and is refused."""
    with pytest.raises(ValidationError) as caught:
        to_person_action(key, "delete")

    assert (caught.value.reason, caught.value.field) == ("missing_identifier", "key")


@pytest.mark.parametrize("mark", ["ms", "SECONDS", True, 1])
def test_record_shape_bad_timestamp_mark_raises_config_error(mark: Any) -> None:
    """A timestamp mark other than seconds or milliseconds stops start-up."""
    with pytest.raises(ConfigError) as caught:
        shape_of({"name": "at", "type": "long", "cio.timestamp": mark})

    assert "cio.timestamp" in str(caught.value)


def test_record_shape_recursive_record_is_bounded() -> None:
    """A recursive record type gives a finite shape instead of looping."""
    shape = shape_of(
        {
            "name": "node",
            "type": {
                "type": "record",
                "name": "Node",
                "fields": [{"name": "next", "type": ["null", "Node"]}],
            },
        }
    )

    depth = 0
    while "next" in shape.nested or "node" in shape.nested:
        shape = shape.nested.get("node") or shape.nested["next"]
        depth += 1

    assert depth <= 40
