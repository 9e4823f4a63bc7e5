"""Entries are written as compact UTF-8 JSON, the same text (up to the spelling
of some floats) as the standard library's, and a NaN never leaves as null."""

from __future__ import annotations

import json
import math
import random
import tracemalloc
from typing import Any

import pytest

from worker.errors import ValidationError
from worker.jsontext import compact, compact_flagged, non_finite
from worker.limits import LimitsError, checked_entry
from worker.mapping import serialize


def _stdlib(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "bool", "none", "float"]
    if depth < 3:
        kinds += ["dict", "list"]
    kind = rng.choice(kinds)
    if kind == "str":
        alphabet = 'abcXYZ019 "\\/\n\t\x00\x1f\x7fé€😀\u2028\u2029'
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if kind == "int":
        return rng.randint(-(2**63), 2**63 - 1)
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "float":
        return rng.choice([0.5, -1.25, 3.0, 1234.5678, rng.uniform(-1e6, 1e6)])
    if kind == "dict":
        return {
            f"k{i}{rng.choice('aé€')}": _random_value(rng, depth + 1)
            for i in range(rng.randint(0, 5))
        }
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 5))]


def test_compact_writes_the_same_text_as_the_standard_library() -> None:
    """Over a thousand random entries (control characters, non-ASCII, emoji,
    line separators, 64-bit integers, nested maps), the bytes are identical."""
    rng = random.Random(11)
    for _ in range(1000):
        value = {"attributes": _random_value(rng), "name": _random_value(rng)}
        assert compact(value) == _stdlib(value)


@pytest.mark.parametrize(
    "value",
    [
        {"big": 2**70},  # beyond 64 bits: orjson refuses, the fallback writes it
        {"negative": -(2**64)},
        {1: "integer key"},
    ],
)
def test_compact_falls_back_for_what_orjson_refuses(value: Any) -> None:
    assert compact(value) == _stdlib(value)


def test_compact_refuses_lone_surrogates_as_the_standard_library_does() -> None:
    with pytest.raises(UnicodeEncodeError):
        compact({"text": "\ud800"})


def test_floats_are_the_same_numbers() -> None:
    values = [1e16, 1e-5, 0.1, 2.5e-300, 1.7976931348623157e308, -0.0, 123.0]
    assert json.loads(compact(values)) == values


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_flagged_and_found_with_its_path(bad: float) -> None:
    value = {"a": {"b": [1, bad]}}
    assert compact_flagged(value)[1]
    paths = [path for path, _ in non_finite(value["a"], "a")]
    assert paths == ["a.b[1]"]


def test_finite_data_without_null_needs_no_exact_look() -> None:
    assert not compact_flagged({"a": [1, 2.5, "x", True]})[1]
    assert compact_flagged({"a": 2**70, "b": "NaN"})[1]  # the fallback's hint


def _identify(attributes: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "person",
        "action": "identify",
        "identifiers": {"id": "42"},
        "attributes": attributes,
    }


def test_checked_entry_refuses_nan_deep_in_a_list_never_sending_null() -> None:
    with pytest.raises(LimitsError) as caught:
        checked_entry(_identify({"scores": [1.0, {"x": math.nan}]}))
    assert caught.value.reason == "not_finite"
    assert caught.value.field == "attributes.scores[1].x"


def test_checked_entry_keeps_real_nulls_and_nan_text() -> None:
    entry = _identify({"tags": [None, "NaN", "Infinity"], "n": {"v": None}})
    assert checked_entry(entry) == _stdlib(entry)


def test_serialize_refuses_nan_outside_the_attributes_too() -> None:
    entry = {"type": "person", "action": "event", "name": "x", "timestamp": math.nan}
    with pytest.raises(ValidationError) as caught:
        serialize(entry)
    assert caught.value.reason == "not_finite"


def test_compact_holds_no_more_memory_than_its_bytes() -> None:
    """Entries stay buffered until delivered, and buffers are capped by the
    entries' byte counts: what one holds in memory must be about its length
    (orjson's own output keeps a 4 KiB buffer per call)."""
    value = {"type": "person", "identifiers": {"email": "a@example.com"}, "n": 1}
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        held = [compact_flagged(value)[0] for _ in range(1_000)]
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    per_entry = (after - before) / len(held)
    assert per_entry < len(held[0]) + 100, per_entry
