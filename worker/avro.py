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
import struct
from collections.abc import Callable
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


def load_schema(
    path: Path, setting: str = "CIO_SCHEMAS__PERSON / CIO_SCHEMAS__EVENT"
) -> Schema:
    """Parse one ``.avsc`` file, or raise ConfigError saying what is wrong and
    which ``setting`` names the file."""
    try:
        return fastavro.parse_schema(json.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(
            f"schema file {path} not found (relative paths start from the working "
            f"folder; set {setting})"
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
            f"schema file {path} ({setting}) is not a valid Avro schema: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


class AvroDecoder:
    """Decodes plain Avro binary values written with the reader schema, or
    with ``writer`` and resolved to the reader schema by Avro's rules."""

    def __init__(self, schema: Schema, writer: Schema | None = None) -> None:
        self._schema = schema
        self._writer = writer

    @property
    def schema(self) -> Schema:
        return self._schema

    def decode(self, value: bytes | None) -> dict[str, Any]:
        """Return the record as a dict, or raise DecodeError."""
        _check_present(value)
        assert value is not None
        if self._writer is not None:
            return read_record(value, 0, self._writer, self._schema)
        return read_record(value, 0, self._schema, None)


class FramedDecoder:
    """Decodes Confluent-framed values, resolving each writer schema by id.

    With ``plain_fallback`` (the "auto" format) a value whose first byte is not
    0 is read as plain Avro instead of refused, written with ``plain_writer``
    when one is given, else with the reader schema.
    """

    def __init__(
        self,
        schema: Schema,
        registry: WriterSchemas,
        *,
        plain_fallback: bool = False,
        plain_writer: Schema | None = None,
    ) -> None:
        self._schema = schema
        self._canonical = _canonical(schema)
        self._registry = registry
        self._plain_fallback = plain_fallback
        self._plain = AvroDecoder(schema, plain_writer)
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
                return self._plain.decode(value)
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
    """Read one record from ``value[start:]``; every failure is a DecodeError.

    Values written with the reader schema itself go through the decoder
    compiled from that schema (``compiled_reader``) first. Whatever it cannot
    read exactly as fastavro would, it leaves to fastavro, which then decodes
    the value or names what is wrong with it.
    """
    if reader is None and type(value) is bytes:
        fast = compiled_reader(writer)
        if fast is not None:
            try:
                decoded, end = fast(value, start)
            except Exception:  # fastavro reads it below and names any problem
                end = -1
            if end == len(value):
                return decoded
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


# -- compiled decoders ----------------------------------------------------------
#
# fastavro's ``schemaless_reader`` costs about 20 us for a 70-byte record on
# the benchmark machine: it re-reads the parsed schema and pulls every field
# through a file object. A decoder compiled once per schema into straight-line
# Python over the value's bytes takes a fraction of that. It returns a value
# only where it is certain to equal fastavro's; anything else (an unusual
# encoding, a logical type, bad or truncated bytes) raises, and ``read_record``
# hands the value to fastavro, which decodes it or names the problem as before.


class _NotFastError(Exception):
    """The compiled decoder cannot read this value exactly as fastavro would."""


class _UnsupportedError(Exception):
    """The schema holds something the compiler leaves to fastavro."""


_FLOAT = struct.Struct("<f").unpack_from
_DOUBLE = struct.Struct("<d").unpack_from
# Largest varint shift whose 7 bits fastavro reads as part of a 64-bit long.
_LAST_SHIFT = 63
_PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
CompiledReader = Callable[[bytes, int], tuple[dict[str, Any], int]]
# id(schema) -> (schema, its decoder or None): the schema is held so that its
# id is not reused while the entry exists.
_COMPILED: dict[int, tuple[Schema, CompiledReader | None]] = {}


def _long_tail(buf: bytes, pos: int, first: int) -> tuple[int, int]:
    """The rest of a varint whose first byte had the continuation bit."""
    n = first & 0x7F
    shift = 7
    while True:
        b = buf[pos]
        pos += 1
        if shift == _LAST_SHIFT and b > 1:
            raise _NotFastError  # more than 64 bits
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7


def compiled_reader(schema: Schema) -> CompiledReader | None:
    """The decoder compiled from a parsed record schema, or None when the schema
    holds what only fastavro reads (logical types, recursive types, ...).

    ``reader(value, start)`` returns the record and the offset after it, or
    raises when fastavro must read the value instead.
    """
    held = _COMPILED.get(id(schema))
    if held is not None and held[0] is schema:
        return held[1]
    try:
        reader: CompiledReader | None = _Compiler(schema).build()
    except _UnsupportedError:
        reader = None
    _COMPILED[id(schema)] = (schema, reader)
    return reader


class _Compiler:
    """Writes one Python function that decodes a record of ``schema``.

    Each emitter appends the lines that read one value into a local variable,
    the ``target`` it is given, advancing ``pos``.
    """

    def __init__(self, schema: Schema) -> None:
        self._schema = schema
        named = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
        self._named: dict[str, Any] = dict(named)
        self._lines: list[str] = []
        self._names = 0
        self._constants: dict[str, Any] = {}
        self._stack: list[str] = []

    def build(self) -> CompiledReader:
        schema = self._schema
        if not isinstance(schema, dict) or schema.get("type") != "record":
            raise _UnsupportedError("not a record")
        self._lines = ["def read(buf, pos):", "    size = len(buf)"]
        self._value(schema, 1, "record")
        self._lines.append("    return record, pos")
        namespace: dict[str, Any] = {
            "_NotFastError": _NotFastError,
            "_long_tail": _long_tail,
            "_FLOAT": _FLOAT,
            "_DOUBLE": _DOUBLE,
            **self._constants,
        }
        source = "\n".join(self._lines)
        name = f"<avro reader of {schema.get('name', 'record')}>"
        exec(compile(source, name, "exec"), namespace)  # noqa: S102
        reader: CompiledReader = namespace["read"]
        return reader

    def _new(self, prefix: str = "v") -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def _emit(self, depth: int, *lines: str) -> None:
        self._lines.extend("    " * depth + line for line in lines)

    def _value(self, schema: Any, depth: int, target: str) -> None:
        if isinstance(schema, list):
            self._union(schema, depth, target)
        elif isinstance(schema, str):
            if schema in _PRIMITIVES:
                self._primitive(schema, depth, target)
            else:
                self._named_type(schema, depth, target)
        elif not isinstance(schema, dict) or "logicalType" in schema:
            raise _UnsupportedError(f"type {schema!r}")
        elif schema.get("type") in _PRIMITIVES:
            self._primitive(schema["type"], depth, target)
        elif schema.get("type") == "record":
            self._record(schema, depth, target)
        elif schema.get("type") in ("map", "array"):
            self._block(schema, depth, target)
        elif schema.get("type") == "enum":
            self._enum(schema, depth, target)
        elif schema.get("type") == "fixed":
            self._fixed(schema, depth, target)
        else:
            raise _UnsupportedError(f"type {schema.get('type')!r}")

    def _named_type(self, name: str, depth: int, target: str) -> None:
        schema = self._named.get(name)
        if schema is None or name in self._stack:
            raise _UnsupportedError(f"named type {name!r} unknown or recursive")
        self._value(schema, depth, target)

    def _record(self, schema: dict[str, Any], depth: int, target: str) -> None:
        name = str(schema.get("name", ""))
        if name in self._stack:
            raise _UnsupportedError(f"recursive record {name!r}")
        self._stack.append(name)
        fields = []
        for avro_field in schema["fields"]:
            var = self._new()
            self._value(avro_field["type"], depth, var)
            fields.append((avro_field["name"], var))
        self._stack.pop()
        items = ", ".join(f"{key!r}: {var}" for key, var in fields)
        self._emit(depth, f"{target} = {{{items}}}")

    def _long(self, depth: int, target: str) -> None:
        b = self._new("b")
        self._emit(
            depth,
            f"{b} = buf[pos]",
            "pos += 1",
            f"if {b} < 0x80:",
            f"    {target} = ({b} >> 1) ^ -({b} & 1)",
            "else:",
            f"    {target}, pos = _long_tail(buf, pos, {b})",
        )

    def _slice(self, depth: int, target: str, decode: bool) -> None:
        """A length, then that many bytes (as text when ``decode``). A length
        of one byte (under 64) is read inline, a longer one by ``_long_tail``;
        a negative one, or one past the end, is left to fastavro."""
        b, n, e = self._new("b"), self._new("n"), self._new("e")
        text = ".decode()" if decode else ""
        self._emit(
            depth,
            f"{b} = buf[pos]",
            f"if {b} < 0x80:",
            f"    if {b} & 1:",
            "        raise _NotFastError",
            "    pos += 1",
            f"    {e} = pos + ({b} >> 1)",
            "else:",
            f"    {n}, pos = _long_tail(buf, pos + 1, {b})",
            f"    if {n} < 0:",
            "        raise _NotFastError",
            f"    {e} = pos + {n}",
            f"if {e} > size:",
            "    raise _NotFastError",
            f"{target} = buf[pos:{e}]{text}",
            f"pos = {e}",
        )

    def _primitive(self, kind: str, depth: int, target: str) -> None:
        if kind == "null":
            self._emit(depth, f"{target} = None")
        elif kind == "boolean":
            b = self._new("b")
            self._emit(
                depth,
                f"{b} = buf[pos]",
                "pos += 1",
                f"if {b} > 1:",
                "    raise _NotFastError",
                f"{target} = {b} == 1",
            )
        elif kind in ("int", "long"):
            self._long(depth, target)
        elif kind == "float":
            self._emit(depth, f"{target} = _FLOAT(buf, pos)[0]", "pos += 4")
        elif kind == "double":
            self._emit(depth, f"{target} = _DOUBLE(buf, pos)[0]", "pos += 8")
        else:
            self._slice(depth, target, decode=kind == "string")

    def _union(self, branches: list[Any], depth: int, target: str) -> None:
        # The index is a varint: branch i is the single byte 2 * i below 64.
        if len(branches) > 63:
            raise _UnsupportedError("union of more than 63 branches")
        index = self._new("b")
        self._emit(depth, f"{index} = buf[pos]", "pos += 1")
        for number, branch in enumerate(branches):
            keyword = "if" if number == 0 else "elif"
            self._emit(depth, f"{keyword} {index} == {2 * number}:")
            self._value(branch, depth + 1, target)
        self._emit(depth, "else:", "    raise _NotFastError")

    def _block(self, schema: dict[str, Any], depth: int, target: str) -> None:
        is_map = schema["type"] == "map"
        count = self._new("c")
        self._emit(depth, f"{target} = {{}}" if is_map else f"{target} = []")
        self._emit(depth, "while True:")
        self._long(depth + 1, count)
        # A negative count is followed by the block's size: fastavro reads
        # those. More items than bytes left could only be items of no bytes
        # (null), and a damaged count must not loop for long.
        self._emit(
            depth + 1,
            f"if {count} == 0:",
            "    break",
            f"if {count} < 0 or {count} > size - pos:",
            "    raise _NotFastError",
            f"for _ in range({count}):",
        )
        item = self._new()
        if is_map:
            key = self._new("k")
            self._slice(depth + 2, key, decode=True)
            self._value(schema["values"], depth + 2, item)
            self._emit(depth + 2, f"{target}[{key}] = {item}")
        else:
            self._value(schema["items"], depth + 2, item)
            self._emit(depth + 2, f"{target}.append({item})")

    def _enum(self, schema: dict[str, Any], depth: int, target: str) -> None:
        index, symbols = self._new("n"), self._new("SYMBOLS")
        self._constants[symbols] = tuple(schema["symbols"])
        self._long(depth, index)
        self._emit(
            depth,
            f"if not 0 <= {index} < {len(schema['symbols'])}:",
            "    raise _NotFastError",
            f"{target} = {symbols}[{index}]",
        )

    def _fixed(self, schema: dict[str, Any], depth: int, target: str) -> None:
        end = self._new("e")
        self._emit(
            depth,
            f"{end} = pos + {int(schema['size'])}",
            f"if {end} > size:",
            "    raise _NotFastError",
            f"{target} = buf[pos:{end}]",
            f"pos = {end}",
        )
