"""The compiled Avro decoder reads every value exactly as fastavro does.

``worker.avro.read_record`` first tries the decoder compiled from the schema
and leaves to fastavro whatever that decoder is not sure of. These tests hold
the two paths to the same answers: equal values of equal types for good
records, and the same DecodeError (reason and message) for damaged ones.
"""

from __future__ import annotations

import io
import random
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro import parse_schema

from worker import avro
from worker.avro import compiled_reader, encode, load_schema, read_record
from worker.errors import DecodeError

ROOT = Path(__file__).resolve().parents[2]

# Every type the compiler reads itself, nested in maps, arrays and unions.
EVERYTHING = {
    "type": "record",
    "name": "Everything",
    "namespace": "test",
    "fields": [
        {"name": "n", "type": "null"},
        {"name": "flag", "type": "boolean"},
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "raw", "type": "bytes"},
        {"name": "s", "type": "string"},
        {"name": "s2", "type": {"type": "string"}},
        {"name": "color", "type": {"type": "enum", "name": "Color",
                                   "symbols": ["RED", "GREEN", "BLUE"]}},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "opt", "type": ["null", "string"], "default": None},
        {"name": "many", "type": ["null", "long", "double", "string", "boolean",
                                  "bytes", "Color"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "nested", "type": {"type": "array", "items": {
            "type": "map", "values": ["null", "long", {"type": "array",
                                                        "items": "double"}]}}},
        {"name": "attrs", "type": {"type": "map", "values": [
            "null", "string", "long", "double", "boolean"]}},
        {"name": "address", "type": ["null", {
            "type": "record", "name": "Address", "fields": [
                {"name": "city", "type": "string"},
                {"name": "zip", "type": ["null", "int"]},
                {"name": "hash", "type": "Hash"},
            ]}]},
        {"name": "home", "type": "Address"},
    ],
}  # fmt: skip

TEXTS = ["", "a", "Ørsted", "日本語のテキスト", "emoji 🎉"]
TEXTS += ["x" * 70, "y" * 300]


def _text(rng: random.Random) -> str:
    return rng.choice(TEXTS) + str(rng.randint(0, 10 ** rng.randint(0, 12)))


def _long(rng: random.Random) -> int:
    return rng.choice(
        [0, 1, -1, 63, 64, -64, -65, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63),
         rng.randint(-(2**63), 2**63 - 1), rng.randint(-1000, 1000)]
    )  # fmt: skip


def _int(rng: random.Random) -> int:
    return rng.choice([0, -1, 1, 2**31 - 1, -(2**31), rng.randint(-(2**31), 2**31 - 1)])


def _double(rng: random.Random) -> float:
    return rng.choice([0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, rng.uniform(-1e6, 1e6)])


def _address(rng: random.Random) -> dict[str, Any]:
    return {
        "city": _text(rng),
        "zip": rng.choice([None, _int(rng)]),
        "hash": rng.randbytes(4),
    }


def _record(rng: random.Random) -> dict[str, Any]:
    scalars = [None, _long(rng), _double(rng), _text(rng), rng.random() < 0.5]
    return {
        "n": None,
        "flag": rng.random() < 0.5,
        "i": _int(rng),
        "l": _long(rng),
        # A float that survives 32 bits unchanged.
        "f": struct.unpack("<f", struct.pack("<f", rng.uniform(-1e3, 1e3)))[0],
        "d": _double(rng),
        "raw": rng.randbytes(rng.randint(0, 80)),
        "s": _text(rng),
        "s2": _text(rng),
        "color": rng.choice(["RED", "GREEN", "BLUE"]),
        "hash": rng.randbytes(4),
        "opt": rng.choice([None, _text(rng)]),
        "many": rng.choice(
            [None, _long(rng), _double(rng), _text(rng), True, b"\x00\xff", "BLUE"]
        ),
        "tags": [_text(rng) for _ in range(rng.randint(0, 70))],
        "nested": [
            {
                _text(rng): rng.choice(
                    [None, _long(rng), [_double(rng) for _ in range(rng.randint(0, 3))]]
                )
                for _ in range(rng.randint(0, 3))
            }
            for _ in range(rng.randint(0, 3))
        ],
        "attrs": {
            f"k{n}_{_text(rng)}": rng.choice(scalars) for n in range(rng.randint(0, 80))
        },
        "address": rng.choice([None, _address(rng)]),
        "home": _address(rng),
    }


def _fastavro(value: bytes, start: int, schema: Any) -> Any:
    """What fastavro alone returns for a value, or the error read_record gives."""
    buffer = io.BytesIO(value)
    buffer.seek(start)
    return fastavro.schemaless_reader(buffer, schema, None)


def _reference(value: bytes, schema: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """read_record with the compiled path switched off: the behaviour before it."""
    with monkeypatch.context() as patched:
        patched.setattr(avro, "compiled_reader", lambda schema: None)
        try:
            return read_record(value, 0, schema, None)
        except DecodeError as exc:
            return (exc.reason, exc.message)


def _actual(value: bytes, schema: Any) -> Any:
    try:
        return read_record(value, 0, schema, None)
    except DecodeError as exc:
        return (exc.reason, exc.message)


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types all the way down (True is not 1, 1 not 1.0),
    with dict keys in the same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # -0.0 is not 0.0
    return bool(a == b)


@pytest.fixture(scope="module")
def everything() -> Any:
    return parse_schema(EVERYTHING)


def test_compiler_reads_every_supported_schema(everything: Any) -> None:
    """The test schema and both shipped schemas compile."""
    assert compiled_reader(everything) is not None
    assert compiled_reader(load_schema(ROOT / "schemas" / "person.avsc")) is not None
    assert compiled_reader(load_schema(ROOT / "schemas" / "person_event.avsc"))


def test_compiled_reader_equals_fastavro_on_random_records(everything: Any) -> None:
    """Hundreds of random records: the same values, types and key order."""
    rng = random.Random(11)
    reader = compiled_reader(everything)
    assert reader is not None
    for _ in range(400):
        value = encode(everything, _record(rng))
        record, end = reader(value, 0)
        assert end == len(value)
        assert _same(record, _fastavro(value, 0, everything))


@pytest.mark.parametrize("name", ["person.avsc", "person_event.avsc"])
def test_compiled_reader_equals_fastavro_on_benchmark_data(name: str) -> None:
    """The shipped schemas on records like the benchmark's and the demo's."""
    from worker.sandbox.sample import event_record, person_record

    schema = load_schema(ROOT / "schemas" / name)
    reader = compiled_reader(schema)
    assert reader is not None
    rng = random.Random(5)
    for n in range(300):
        if name == "person.avsc":
            record = person_record(f"user{n}@example.com", rng, rng.randint(0, 30))
        else:
            record = event_record(f"user{n}@example.com", rng, n)
        value = encode(schema, record)
        assert _same(reader(value, 0)[0], _fastavro(value, 0, schema))
        assert _same(read_record(value, 0, schema, None), record)


def test_good_values_do_not_reach_fastavro(
    everything: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """read_record answers good values from the compiled reader alone."""
    rng = random.Random(2)
    values = [encode(everything, _record(rng)) for _ in range(50)]
    expected = [_fastavro(value, 0, everything) for value in values]

    def refuse(*_: Any) -> None:
        raise AssertionError("fastavro was asked")

    monkeypatch.setattr(avro.fastavro, "schemaless_reader", refuse)
    for value, record in zip(values, expected, strict=True):
        assert _same(read_record(value, 0, everything, None), record)


def test_damaged_values_decode_or_fail_exactly_as_before(
    everything: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncations and random byte changes of real values: the result, or the
    DecodeError's reason and message, is what it was with fastavro alone."""
    rng = random.Random(3)
    values = [encode(everything, _record(rng)) for _ in range(10)]
    damaged: list[bytes] = []
    for value in values:
        step = max(1, len(value) // 120)
        damaged += [value[:cut] for cut in range(0, len(value), step)]
        damaged.append(value + b"\x00")
        for _ in range(80):
            changed = bytearray(value)
            for _ in range(rng.randint(1, 3)):
                changed[rng.randrange(len(changed))] = rng.randrange(256)
            damaged.append(bytes(changed))
    with monkeypatch.context() as patched:
        patched.setattr(avro, "compiled_reader", lambda schema: None)
        expected = [_actual(value, everything) for value in damaged]
    for value, before in zip(damaged, expected, strict=True):
        assert _same(_actual(value, everything), before), value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"\x03", "negative union-free length: a negative count"),
        (b"\x02\x00\x01", "a boolean byte of 2"),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "a varint of 70 bits"),
        (b"\x01\x06\x02k\x00\x00", "a map block with a negative count and size"),
    ],
)
def test_unusual_encodings_are_left_to_fastavro(
    value: bytes, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encodings the compiled reader does not read itself give fastavro's answer."""
    schema = parse_schema(
        {
            "type": "record",
            "name": "Odd",
            "fields": [
                {"name": "m", "type": {"type": "map", "values": "null"}},
                {"name": "b", "type": ["null", "boolean"]},
            ],
        }
    )
    for candidate in (value, value + b"\x00", value + b"\x00\x00"):
        assert _same(
            _actual(candidate, schema), _reference(candidate, schema, monkeypatch)
        ), why


def test_huge_count_of_null_items_is_left_to_fastavro(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An array of many nulls takes no bytes per item: fastavro reads it."""
    schema = parse_schema(
        {
            "type": "record",
            "name": "Nulls",
            "fields": [{"name": "a", "type": {"type": "array", "items": "null"}}],
        }
    )
    value = encode(schema, {"a": [None] * 500})
    assert read_record(value, 0, schema, None) == {"a": [None] * 500}
    assert _same(_actual(value, schema), _reference(value, schema, monkeypatch))


@pytest.mark.parametrize(
    "field_type",
    [
        {"type": "long", "logicalType": "timestamp-millis"},
        {"type": "string", "logicalType": "uuid"},
        {"type": "int", "logicalType": "date"},
        {"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 2},
    ],
)
def test_logical_types_are_not_compiled(field_type: dict[str, Any]) -> None:
    """A schema with a logical type is read by fastavro alone."""
    schema = parse_schema(
        {"type": "record", "name": "L", "fields": [{"name": "x", "type": field_type}]}
    )
    assert compiled_reader(schema) is None


def test_recursive_schema_is_not_compiled() -> None:
    """A type that contains itself is read by fastavro alone."""
    schema = parse_schema(
        {
            "type": "record",
            "name": "Node",
            "fields": [
                {"name": "value", "type": "long"},
                {"name": "next", "type": ["null", "Node"]},
            ],
        }
    )
    assert compiled_reader(schema) is None
    value = encode(schema, {"value": 1, "next": {"value": 2, "next": None}})
    assert read_record(value, 0, schema, None) == {
        "value": 1,
        "next": {"value": 2, "next": None},
    }


def test_compiled_reader_starts_at_the_given_offset(everything: Any) -> None:
    """A framed value is read after its 5-byte header, as fastavro reads it."""
    rng = random.Random(1)
    value = b"\x00\x00\x00\x00\x07" + encode(everything, _record(rng))
    assert _same(
        read_record(value, 5, everything, None), _fastavro(value, 5, everything)
    )


@pytest.mark.parametrize(
    ("field_type", "value"),
    [
        ("string", b"\x03a"),  # length -2, then a byte that would fit length 1
        ("bytes", b"\x03a"),
        ("string", b"\x81\x01" + b"a" * 64),  # length -65 in two bytes
        ("string", b"\x04\xff\xfe"),  # not UTF-8
        ("long", b"\xff" * 9 + b"\x01"),  # the largest 64-bit zigzag value
        ("long", b"\xff" * 9 + b"\x7f"),  # 70 bits
        ("long", b"\xff" * 9 + b"\x02"),  # 65 bits
        ("long", b"\x80" * 10 + b"\x00"),  # 11 bytes
        ("int", b"\xfe\xff\xff\xff\x0f"),  # 2**31 - 1
        ("int", b"\x80\x80\x80\x80\x10"),  # 2**31, past an int's range
        ("boolean", b"\x02"),
        ("boolean", b"\x01"),
        ("double", b"\x00" * 7),
        ("float", b"\x00" * 3),
        (["null", "string"], b"\x01"),  # union index -1
        (["null", "string"], b"\x04"),  # union index 2 of 2
        (["null", "string"], b"\x80\x00"),  # index 0 in two bytes
        ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, b"\x04"),
        ({"type": "enum", "name": "E", "symbols": ["A", "B"]}, b"\x01"),
        ({"type": "fixed", "name": "F", "size": 3}, b"ab"),
        ({"type": "array", "items": "long"}, b"\x03\x02\x02\x04\x00"),
        ({"type": "array", "items": "long"}, b"\x04\x02\x04\x00"),
        ({"type": "map", "values": "long"}, b"\x02\x02k\x02\x02\x02k\x04\x00"),
    ],
)
def test_edge_encodings_read_as_fastavro_reads_them(
    field_type: Any, value: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative lengths and indexes, over-long varints, bad UTF-8, short
    numbers, duplicate map keys: the compiled path changes no answer."""
    schema = parse_schema(
        {
            "type": "record",
            "name": "Edge",
            "fields": [{"name": "x", "type": field_type}],
        }
    )
    assert compiled_reader(schema) is not None
    assert _same(_actual(value, schema), _reference(value, schema, monkeypatch))
