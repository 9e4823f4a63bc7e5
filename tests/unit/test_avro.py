"""Unit tests of worker.avro: schema loading and decoding of record bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.avro import AvroDecoder, encode, load_schema
from worker.errors import ConfigError, DecodeError

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
