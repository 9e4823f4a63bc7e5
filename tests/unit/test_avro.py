"""Unit tests of worker.avro: schema loading and decoding of record bytes."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from fastavro import parse_schema

from worker.avro import AvroDecoder, FramedDecoder, encode, encode_framed, load_schema
from worker.errors import (
    ConfigError,
    DecodeError,
    InvalidRecordError,
    TransientError,
)

ROOT = Path(__file__).resolve().parents[2]
PERSON_SCHEMA = ROOT / "schemas" / "person.avsc"
EVENT_SCHEMA = ROOT / "schemas" / "person_event.avsc"

PERSON = {
    "person_email": "ann@example.com",
    "first_name": "Ann",
    "last_name": None,
    "plan": "pro",
    "country": "SE",
    "created_at": 1_700_000_000,
    "lifetime_value": 12.5,
    "is_active": True,
    "attributes": {"tier": "gold", "visits": 3, "ratio": 0.5, "vip": False},
}
EVENT = {
    "person_email": "ann@example.com",
    "event_name": "purchase",
    "event_id": None,
    "timestamp": 1_700_000_000,
    "value": 9.99,
    "currency": "EUR",
    "data": {"sku": "A-1", "nothing": None},
}


@pytest.fixture(scope="module")
def person_schema() -> Any:
    return load_schema(PERSON_SCHEMA)


@pytest.fixture(scope="module")
def person_decoder(person_schema: Any) -> AvroDecoder:
    return AvroDecoder(person_schema)


@pytest.mark.parametrize(
    ("schema_path", "record"), [(PERSON_SCHEMA, PERSON), (EVENT_SCHEMA, EVENT)]
)
def test_decode_encoded_record_round_trips(
    schema_path: Path, record: dict[str, Any]
) -> None:
    """A record written with a schema decodes back to the same values."""
    schema = load_schema(schema_path)
    data = encode(schema, record)

    decoded = AvroDecoder(schema).decode(data)

    assert decoded == record


def test_decode_minimal_record_fills_defaults(
    person_schema: Any, person_decoder: AvroDecoder
) -> None:
    """Optional fields left out by the writer decode as null and the map as empty."""
    data = encode(person_schema, {"person_email": "a@x.io"})

    decoded = person_decoder.decode(data)

    assert decoded["person_email"] == "a@x.io"
    assert decoded["first_name"] is None
    assert decoded["attributes"] == {}


@pytest.mark.parametrize("keep", [1, 5, 14, -1])
def test_decode_truncated_value_raises_truncated_avro(
    person_schema: Any, person_decoder: AvroDecoder, keep: int
) -> None:
    """A value cut short anywhere is refused as truncated_avro."""
    data = encode(person_schema, PERSON)

    with pytest.raises(DecodeError) as caught:
        person_decoder.decode(data[:keep])

    assert caught.value.reason == "truncated_avro"
    assert caught.value.stage == "decode"


def test_decode_string_length_past_end_raises_truncated_avro(
    person_decoder: AvroDecoder,
) -> None:
    """A string whose declared length runs past the value is refused."""
    data = bytes([0x40]) + b"abc"  # declares a 32-byte string, holds 3 bytes

    with pytest.raises(DecodeError) as caught:
        person_decoder.decode(data)

    assert caught.value.reason == "truncated_avro"


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\x00", b"trailing"])
def test_decode_trailing_bytes_raises_trailing_bytes(
    person_schema: Any, person_decoder: AvroDecoder, extra: bytes
) -> None:
    """Bytes left after the record mean another schema wrote it."""
    data = encode(person_schema, PERSON) + extra

    with pytest.raises(DecodeError) as caught:
        person_decoder.decode(data)

    assert caught.value.reason == "trailing_bytes"
    assert str(len(extra)) in caught.value.message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty_value"),
        (None, "null_value"),
        (b"\x06a@x\x14", "bad_avro"),  # union branch 10 of a two-branch union
    ],
)
def test_decode_unusable_value_raises_decode_error(
    person_decoder: AvroDecoder, value: bytes | None, reason: str
) -> None:
    """Empty values, tombstones and impossible Avro each get their own reason."""
    with pytest.raises(DecodeError) as caught:
        person_decoder.decode(value)

    assert caught.value.reason == reason
    assert caught.value.stage == "decode"


def test_decode_non_record_schema_raises_not_a_record(tmp_path: Path) -> None:
    """A schema that is not a record cannot produce a mappable record."""
    path = tmp_path / "int.avsc"
    path.write_text('"int"')
    decoder = AvroDecoder(load_schema(path))

    with pytest.raises(DecodeError) as caught:
        decoder.decode(b"\x02")

    assert caught.value.reason == "not_a_record"


def test_load_schema_missing_file_raises_config_error(tmp_path: Path) -> None:
    """A schema path that does not exist names the path and the setting."""
    path = tmp_path / "nope.avsc"

    with pytest.raises(ConfigError) as caught:
        load_schema(path)

    assert str(path) in str(caught.value)
    assert "CIO_SCHEMAS__PERSON" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        "{",
        "not json",
        '{"type": "record"}',
        '{"type": "nosuch"}',
        '{"type": "record", "name": "R", "fields": [{"name": "a"}]}',
    ],
)
def test_load_schema_invalid_raises_config_error(tmp_path: Path, text: str) -> None:
    """A file that is not JSON or not an Avro schema is a configuration error."""
    path = tmp_path / "bad.avsc"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_schema(path)

    assert "not a valid Avro schema" in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "text",
    ["{}", '{"type": "map"}', '{"type": "enum", "name": "E"}', "[1, 2]", "null"],
)
def test_load_schema_malformed_schema_raises_config_error(
    tmp_path: Path, text: str
) -> None:
    """Every malformed schema file gives a ConfigError, never another exception."""
    path = tmp_path / "bad.avsc"
    path.write_text(text)

    with pytest.raises(ConfigError):
        load_schema(path)


# -- schema evolution, enums and the Confluent wire format -------------------------

READER = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [
        {"name": "person_email", "type": "string"},
        {
            "name": "tier",
            "type": {
                "type": "enum",
                "name": "Tier",
                "symbols": ["FREE", "PRO", "UNKNOWN"],
                "default": "UNKNOWN",
            },
            "default": "FREE",
        },
        {
            "name": "color",
            "type": {"type": "enum", "name": "Color", "symbols": ["RED", "GREEN"]},
            "default": "RED",
        },
        {"name": "plan", "type": ["null", "string"], "default": None},
    ],
}
# Older: no plan; enums with the symbols in another order.
WRITER_OLD = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [
        {"name": "person_email", "type": "string"},
        {
            "name": "tier",
            "type": {"type": "enum", "name": "Tier", "symbols": ["PRO", "FREE"]},
        },
        {
            "name": "color",
            "type": {"type": "enum", "name": "Color", "symbols": ["GREEN", "RED"]},
        },
    ],
}
# Newer: an extra field and enum symbols the reader has never heard of.
WRITER_NEW = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [
        {"name": "person_email", "type": "string"},
        {"name": "nickname", "type": "string"},
        {
            "name": "tier",
            "type": {
                "type": "enum",
                "name": "Tier",
                "symbols": ["FREE", "PRO", "ENTERPRISE"],
            },
        },
        {
            "name": "color",
            "type": {
                "type": "enum",
                "name": "Color",
                "symbols": ["RED", "GREEN", "BLUE"],
            },
        },
        {"name": "plan", "type": ["null", "string"], "default": None},
    ],
}
WRITER_CLASH = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [{"name": "person_email", "type": "long"}],
}


class FakeRegistry:
    """Writer schemas by id; unknown ids are bad data, ``down`` an outage."""

    def __init__(self, schemas: dict[int, Any], down: bool = False) -> None:
        self.schemas = {i: parse_schema(s) for i, s in schemas.items()}
        self.down = down
        self.calls: list[int] = []

    def writer_schema(self, schema_id: int) -> Any:
        self.calls.append(schema_id)
        if self.down:
            raise TransientError("registry down")
        if schema_id not in self.schemas:
            raise DecodeError("unknown_schema_id", f"schema id {schema_id} unknown")
        return self.schemas[schema_id]


REGISTRY_SCHEMAS = {1: READER, 2: WRITER_OLD, 3: WRITER_NEW, 4: WRITER_CLASH}


@pytest.fixture
def framed() -> FramedDecoder:
    return FramedDecoder(parse_schema(READER), FakeRegistry(REGISTRY_SCHEMAS))


@pytest.mark.parametrize(
    ("schema_id", "record", "expected"),
    [
        (
            1,
            {"person_email": "a@x.io", "tier": "PRO", "color": "GREEN", "plan": "p"},
            {"person_email": "a@x.io", "tier": "PRO", "color": "GREEN", "plan": "p"},
        ),
        # reordered symbols resolve by name; the reader's new field takes its default
        (
            2,
            {"person_email": "a@x.io", "tier": "FREE", "color": "GREEN"},
            {"person_email": "a@x.io", "tier": "FREE", "color": "GREEN", "plan": None},
        ),
        (
            2,
            {"person_email": "a@x.io", "tier": "PRO", "color": "RED"},
            {"person_email": "a@x.io", "tier": "PRO", "color": "RED", "plan": None},
        ),
        # a field the reader dropped is skipped; an unknown symbol takes the default
        (
            3,
            {
                "person_email": "a@x.io",
                "nickname": "al",
                "tier": "ENTERPRISE",
                "color": "RED",
                "plan": "p",
            },
            {"person_email": "a@x.io", "tier": "UNKNOWN", "color": "RED", "plan": "p"},
        ),
    ],
)
def test_framed_decode_resolves_writer_against_reader(
    framed: FramedDecoder, schema_id: int, record: dict[str, Any], expected: Any
) -> None:
    """Older and newer writer schemas decode to the reader schema's record."""
    value = encode_framed(schema_id, parse_schema(REGISTRY_SCHEMAS[schema_id]), record)

    assert framed.decode(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty_value"),
        (None, "null_value"),
        (b'{"person_email": "a@x.io", "tier": "PRO"}', "not_avro"),
        (b'  [{"person_email": "a@x.io"}]', "not_avro"),
        (b"\x01\x00\x00\x00\x01\x0ca@x.io\x00\x00\x00", "bad_magic_byte"),
        (b"\x7f", "bad_magic_byte"),
        (b"\x00\x00\x00", "truncated_avro"),
        (b"\x00\x00\x00\x00\x09\x0ca@x.io\x00\x00\x00", "unknown_schema_id"),
        (b"\x00\x00\x00\x00\x01\x0ca@x", "truncated_avro"),
        (b"\x00\x00\x00\x00\x01\x0ca@x.io\x00\x00\x00\x00", "trailing_bytes"),
        (b"\x00\x00\x00\x00\x01\x0ca@x.io\x00\x0a\x00", "bad_avro"),  # color 5
        (b"\x00\x00\x00\x00\x04\x02", "schema_mismatch"),  # long, not string
    ],
)
def test_framed_decode_bad_value_raises_decode_error(
    framed: FramedDecoder, value: bytes | None, reason: str
) -> None:
    """Every malformed framed value is refused with a reason that names the fault."""
    with pytest.raises(DecodeError) as caught:
        framed.decode(value)

    assert caught.value.reason == reason
    assert caught.value.stage == "decode"


def test_framed_decode_unknown_symbol_without_default_raises() -> None:
    """A symbol the reader lacks, in an enum without a default, is bad data."""
    decoder = FramedDecoder(parse_schema(READER), FakeRegistry(REGISTRY_SCHEMAS))
    value = encode_framed(
        3,
        parse_schema(WRITER_NEW),
        {"person_email": "a@x.io", "nickname": "n", "tier": "PRO", "color": "BLUE"},
    )

    with pytest.raises(DecodeError) as caught:
        decoder.decode(value)

    assert caught.value.reason == "unknown_enum_symbol"
    assert "BLUE" in caught.value.message


def test_framed_decode_registry_down_raises_transient_not_decode() -> None:
    """An unreachable registry is an outage: TransientError, never a dead letter."""
    decoder = FramedDecoder(parse_schema(READER), FakeRegistry({}, down=True))
    value = encode_framed(1, parse_schema(READER), {"person_email": "a@x.io"})

    with pytest.raises(TransientError) as caught:
        decoder.decode(value)

    assert not isinstance(caught.value, InvalidRecordError)


def test_framed_decode_asks_registry_once_per_schema_id() -> None:
    """The writer and reader pair of an id is resolved once, then cached."""
    registry = FakeRegistry(REGISTRY_SCHEMAS)
    decoder = FramedDecoder(parse_schema(READER), registry)
    record = {"person_email": "a@x.io", "tier": "PRO", "color": "RED"}
    value = encode_framed(2, parse_schema(WRITER_OLD), record)

    for _ in range(5):
        decoder.decode(value)

    assert registry.calls == [2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # framed: first byte 0
        (
            b"\x00\x00\x00\x00\x02\x0ca@x.io\x02\x02",
            {"person_email": "a@x.io", "tier": "FREE", "color": "RED", "plan": None},
        ),
        # plain: email length 6 zigzags to byte 12
        (
            b"\x0ca@x.io\x02\x02\x00",
            {"person_email": "a@x.io", "tier": "PRO", "color": "GREEN", "plan": None},
        ),
    ],
)
def test_auto_decode_framed_or_plain_by_first_byte(
    value: bytes, expected: dict[str, Any]
) -> None:
    """The auto format reads framed values by id and anything else as plain Avro."""
    decoder = FramedDecoder(
        parse_schema(READER), FakeRegistry(REGISTRY_SCHEMAS), plain_fallback=True
    )

    assert decoder.decode(value) == expected


@pytest.mark.parametrize(
    "value",
    [b'{"person_email": "a@x.io"}', b"[1, 2, 3]", b' {"a": {"b": [true, null]}}'],
)
def test_plain_decode_json_text_raises_not_avro(
    person_decoder: AvroDecoder, value: bytes
) -> None:
    """JSON on a plain Avro topic is named as JSON, not as a truncated record."""
    with pytest.raises(DecodeError) as caught:
        person_decoder.decode(value)

    assert caught.value.reason == "not_avro"
    assert "JSON" in caught.value.message


def test_plain_decode_logical_types_to_python_values() -> None:
    """Decimal, date, uuid, timestamps and bytes decode to their Python types."""
    schema = parse_schema(LOGICAL_SCHEMA)
    record = {
        "price": Decimal("12.30"),
        "day": date(2024, 2, 29),
        "ref": UUID("6b30fa27-9e05-4818-8e68-a9e194ddc832"),
        "at": datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        "at_us": datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "blob": b"\x00\xffhi",
        "code": b"AB",
    }

    decoded = AvroDecoder(schema).decode(encode(schema, record))

    assert decoded == record


LOGICAL_SCHEMA = {
    "type": "record",
    "name": "Logical",
    "fields": [
        {
            "name": "price",
            "type": {
                "type": "bytes",
                "logicalType": "decimal",
                "precision": 10,
                "scale": 2,
            },
        },
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "ref", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "at_us", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "blob", "type": "bytes"},
        {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 2}},
    ],
}


def test_encode_framed_writes_magic_byte_and_big_endian_id() -> None:
    """The Confluent header is byte 0 and the id as 4 big-endian bytes."""
    value = encode_framed(258, parse_schema(READER), {"person_email": "a@x.io"})

    assert value[:5] == b"\x00\x00\x00\x01\x02"
