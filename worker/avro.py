"""Avro schemas and decoding: the one place record bytes become Python values.

Schemas are data: ``.avsc`` files parsed once at start-up. A record's value is
plain Avro binary written with the reader schema. Every fastavro failure becomes a
``DecodeError`` (stage "decode") carrying a reason code, so the record is
dead-lettered and the worker goes on.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
from fastavro.types import Schema

from worker.errors import ConfigError, DecodeError


def load_schema(path: Path) -> Schema:
    """Parse one ``.avsc`` file, or raise ConfigError saying what is wrong."""
    try:
        return fastavro.parse_schema(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"schema file {path} not found (relative paths start from the working "
            "folder; set CIO_SCHEMAS__PERSON / CIO_SCHEMAS__EVENT)"
        ) from None
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise ConfigError(
            f"schema file {path} is not a valid Avro schema: {exc}"
        ) from exc


class AvroDecoder:
    """Decodes plain Avro binary values written with one schema."""

    def __init__(self, schema: Schema) -> None:
        self._schema = schema

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """Return the record as a dict, or raise DecodeError."""
        if value is None:
            raise DecodeError("null_value", "the record has no value (tombstone)")
        if not value:
            raise DecodeError("empty_value", "the record's value is empty")
        buffer = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buffer, self._schema, None)
        except (EOFError, StopIteration) as exc:
            raise DecodeError(
                "truncated_avro", "the value ends before the record does"
            ) from exc
        except Exception as exc:
            raise DecodeError(
                "bad_avro", f"the value is not Avro for this schema: {exc}"
            ) from exc
        if buffer.tell() != len(value):
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
