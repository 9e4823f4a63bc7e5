"""Compact UTF-8 JSON, the form in which entries are sent and measured.

Entries are written by orjson: the same compact text as ``json.dumps`` with
``separators=(",", ":")`` and ``ensure_ascii=False`` for everything an entry
holds, at a tenth of the cost (only the spelling of some floats differs, as in
``1e+16`` for ``1e16``; both are JSON numbers of the same value). What orjson
refuses (integers beyond 64 bits, text with lone surrogates, keys that are not
strings) is written by the standard library instead, so the output never
depends on which writer ran, only its speed.

orjson writes a NaN or an infinity as ``null``, where JSON has no such number
at all: ``compact_flagged`` also tells callers when the exact look at the
values (``non_finite``) is needed, so that such a value is refused, never sent
as null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import orjson

# allow_nan: the fallback writes NaN and Infinity as tokens, which the caller's
# exact look then reports. Built once: json.dumps builds an encoder on every
# call with arguments like these.
_ENCODE = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=True
).encode
_ORJSON = orjson.dumps


def compact(value: Any) -> bytes:
    """Compact UTF-8 JSON of ``value``; UnicodeEncodeError for text that UTF-8
    cannot carry (lone surrogates). A NaN or an infinity comes out as null or
    as a NaN/Infinity token: use ``compact_flagged`` where one may be present."""
    return compact_flagged(value)[0]


def compact_flagged(value: Any) -> tuple[bytes, bool]:
    """``compact(value)`` and whether it may hold a NaN or an infinity.

    False is certain; True is only a hint (a null, or the text "NaN", may be
    an ordinary value), to be settled by ``non_finite``. orjson writes those
    numbers as null, the fallback as NaN/Infinity tokens: one scan either way.
    """
    try:
        # orjson's bytes keep the capacity of its output buffer, 4 KiB at
        # least: a buffered entry of 300 bytes held 4 KiB, so a full buffer held
        # ten times the bytes it counts. An exact copy costs a quarter of a
        # microsecond.
        data = bytes(memoryview(_ORJSON(value)))
        return data, data.find(b"null") >= 0
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        data = _ENCODE(value).encode()
        return data, data.find(b"NaN") >= 0 or data.find(b"Infinity") >= 0


def non_finite(value: Any, path: str) -> Iterator[tuple[str, float]]:
    """Every NaN or infinity inside ``value``, with its path (``a.b[2]``)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite(item, f"{path}.{_short(key)}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from non_finite(item, f"{path}[{index}]")


def _short(key: Any) -> str:
    name = str(key)
    return name if len(name) <= 60 else name[:57] + "..."
