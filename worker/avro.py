"""Avro schemas and decoding: the one place record bytes become Python values.

Schemas are data: ``.avsc`` files parsed once at start-up into the *reader*
schema of a topic. A value arrives in one of two framings, chosen per topic:

- plain Avro binary written with the reader schema (``AvroDecoder``);
- the Confluent wire format: byte 0, a 4-byte big-endian schema id, then Avro
  written with that registry schema (``FramedDecoder``). The writer schema is
  resolved against the reader schema by Avro's rules: fields the reader added
  take their defaults, fields it dropped are skipped, enum symbols match by
  name and an unknown one takes the reader enum's default.

Every failure that is the record's fault becomes a ``DecodeError`` (stage
"decode") with a reason code, so the record is dead-lettered and the worker
goes on. A registry that cannot be reached raises ``TransientError`` from
``worker.registry`` instead: the record is fine and must wait.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.types import Schema

from worker.errors import ConfigError, DecodeError

MAGIC_BYTE = 0
HEADER_BYTES = 5  # the magic byte and the 4-byte schema id


class WriterSchemas(Protocol):
    """Where framed values find their writer schema (``worker.registry``)."""

    def writer_schema(self, schema_id: int) -> Schema:
        """The parsed schema of an id; DecodeError if unknown, TransientError if
        the registry cannot answer now."""
        ...


class Decoder(Protocol):
    """Turns one record value into a dict; ``schema`` is the reader schema."""

    @property
    def schema(self) -> Schema: ...

    def decode(self, value: bytes | None) -> dict[str, Any]: ...


def load_schema(path: Path) -> Schema:
    """Parse one ``.avsc`` file, or raise ConfigError saying what is wrong."""
    try:
        return fastavro.parse_schema(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"schema file {path} not found (relative paths start from the working "
            "folder; set CIO_SCHEMAS__PERSON / CIO_SCHEMAS__EVENT)"
        ) from None
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        fastavro.schema.SchemaParseException,
    ) as exc:
        # fastavro reports a malformed schema with whatever Python raised on
        # the way (a KeyError for a record without fields, ...).
        raise ConfigError(
            f"schema file {path} is not a valid Avro schema: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


class AvroDecoder:
    """Decodes plain Avro binary values written with the reader schema."""

    def __init__(self, schema: Schema) -> None:
        self._schema = schema

    @property
    def schema(self) -> Schema:
        return self._schema

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """Return the record as a dict, or raise DecodeError."""
        _check_present(value)
        assert value is not None
        return read_record(value, 0, self._schema, None)


class FramedDecoder:
    """Decodes Confluent-framed values, resolving each writer schema by id.

    With ``plain_fallback`` (the "auto" format) a value whose first byte is not
    0 is read as plain Avro instead of refused.
    """

    def __init__(
        self, schema: Schema, registry: WriterSchemas, *, plain_fallback: bool = False
    ) -> None:
        self._schema = schema
        self._canonical = _canonical(schema)
        self._registry = registry
        self._plain_fallback = plain_fallback
        # schema id -> (writer, reader or None when they are the same schema)
        self._pairs: dict[int, tuple[Schema, Schema | None]] = {}

    @property
    def schema(self) -> Schema:
        return self._schema

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """Return the record as a dict; DecodeError, or TransientError from the
        registry."""
        _check_present(value)
        assert value is not None
        if value[0] != MAGIC_BYTE:
            if self._plain_fallback:
                return read_record(value, 0, self._schema, None)
            raise _not_framed(value)
        if len(value) < HEADER_BYTES:
            raise DecodeError(
                "truncated_avro",
                f"the value is {len(value)} bytes, shorter than the 5-byte "
                "Confluent header (magic byte and schema id)",
            )
        schema_id = int.from_bytes(value[1:HEADER_BYTES], "big")
        writer, reader = self._pair(schema_id)
        return read_record(value, HEADER_BYTES, writer, reader)

    def _pair(self, schema_id: int) -> tuple[Schema, Schema | None]:
        pair = self._pairs.get(schema_id)
        if pair is None:
            writer = self._registry.writer_schema(schema_id)
            same = _canonical(writer) == self._canonical
            pair = (writer, None if same else self._schema)
            self._pairs[schema_id] = pair
        return pair


def read_record(
    value: bytes, start: int, writer: Schema, reader: Schema | None
) -> dict[str, Any]:
    """Read one record from ``value[start:]``; every failure is a DecodeError."""
    buffer = io.BytesIO(value)
    buffer.seek(start)
    try:
        record = fastavro.schemaless_reader(buffer, writer, reader)
    except SchemaResolutionError as exc:
        raise _resolution_error(exc) from exc
    except Exception as exc:
        raise _read_error(value, exc) from exc
    if buffer.tell() != len(value):
        if _looks_like_json(value):
            raise _json_error()
        raise DecodeError(
            "trailing_bytes",
            f"{len(value) - buffer.tell()} bytes left after the record; the "
            "value was written with another schema",
        )
    if not isinstance(record, dict):
        raise DecodeError("not_a_record", "the schema does not describe a record")
    return record


def encode(schema: Schema, record: dict[str, Any]) -> bytes:
    """Write one record as plain Avro binary (for producers, tests and the demo)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, record)
    return buffer.getvalue()


def encode_framed(schema_id: int, schema: Schema, record: dict[str, Any]) -> bytes:
    """Write one record in the Confluent wire format (for tests and producers)."""
    header = bytes([MAGIC_BYTE]) + schema_id.to_bytes(4, "big")
    return header + encode(schema, record)


def _check_present(value: bytes | None) -> None:
    if value is None:
        raise DecodeError("null_value", "the record has no value (tombstone)")
    if not value:
        raise DecodeError("empty_value", "the record's value is empty")


def _canonical(schema: Schema) -> str:
    """The schema as sorted JSON: equal text means no resolution is needed."""
    return json.dumps(schema, sort_keys=True, default=str)


def _resolution_error(exc: SchemaResolutionError) -> DecodeError:
    text = str(exc)
    if "not found in reader symbol list" in text:  # fastavro's words; see below
        return DecodeError(
            "unknown_enum_symbol",
            f"an enum symbol the reader schema lacks and has no default for: {text}",
        )
    return DecodeError(
        "schema_mismatch",
        f"the writer schema cannot be read with the reader schema: {text}",
    )


def _read_error(value: bytes, exc: Exception) -> DecodeError:
    """Name what is wrong with bytes fastavro could not read.

    fastavro tells a value cut short only by its message: an EOFError for a
    length past the end ("Expected 36 bytes, read 4"), an IndexError out of the
    varint reader ("string index out of range"). A negative length or a union
    or enum index out of range is damage, not truncation. Should fastavro word
    these differently one day, such values fall back to ``bad_avro``: the reason
    gets vaguer, the record is still dead-lettered.
    """
    if _looks_like_json(value):
        return _json_error()
    text = str(exc)
    truncated = (isinstance(exc, EOFError) and "Expected -" not in text) or (
        isinstance(exc, IndexError) and "string index" in text
    )
    if truncated:
        return DecodeError("truncated_avro", "the value ends before the record does")
    return DecodeError(
        "bad_avro",
        f"the value is not Avro for this schema: {type(exc).__name__}: {text}",
    )


def _not_framed(value: bytes) -> DecodeError:
    if _looks_like_json(value):
        return _json_error()
    return DecodeError(
        "bad_magic_byte",
        f"the first byte is {value[0]}, not 0: the value is not in the Confluent "
        "wire format (schema id, then Avro); set the topic's format to avro if "
        "its producers write plain Avro",
    )


def _looks_like_json(value: bytes) -> bool:
    """True for JSON text: an object or array that parses. Called only on failure."""
    if value.lstrip(b" \t\r\n")[:1] not in (b"{", b"["):
        return False
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def _json_error() -> DecodeError:
    return DecodeError(
        "not_avro",
        "the value is JSON text, not Avro: the producer must write Avro with "
        "the topic's schema",
    )
