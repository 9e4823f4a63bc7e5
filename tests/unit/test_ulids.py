"""worker.ulids and the derived event ids: the same text python-ulid writes."""

from __future__ import annotations

import hashlib
import random

import pytest
from ulid import ULID

from worker.mapping import Coordinates, derive_event_id
from worker.ulids import MAX_MILLIS, ulid_text


def _python_ulid_event_id(coordinates: Coordinates) -> str:
    """derive_event_id as it was written before worker.ulids: the reference."""
    key = f"{coordinates.topic}\x00{coordinates.partition}\x00{coordinates.offset}"
    digest = hashlib.sha256(key.encode()).digest()[:10]
    millis = max(coordinates.timestamp_ms, 0).to_bytes(6, "big")
    return str(ULID.from_bytes(millis + digest))


EDGE_TIMES = [
    0,
    1,
    31,
    32,
    1023,
    1024,
    2**40 - 1,
    2**40,
    2**47,
    MAX_MILLIS,
    -1,
    -(2**50),
]


def test_derive_event_id_equals_python_ulid_for_many_coordinates() -> None:
    """Twenty thousand coordinates, random and at the edges of each part."""
    rng = random.Random(17)
    coordinates = [
        Coordinates(
            rng.choice(["persons", "person-events", "t", "é-topic", ""]),
            rng.randint(0, 2**31 - 1),
            rng.choice([0, rng.randint(0, 2**63 - 1), rng.randint(0, 10**6)]),
            rng.choice([*EDGE_TIMES, rng.randint(0, MAX_MILLIS), 1_760_000_000_000]),
        )
        for _ in range(20_000)
    ]
    coordinates += [
        Coordinates("t", 0, offset, t) for offset in range(50) for t in EDGE_TIMES
    ]
    for where in coordinates:
        assert derive_event_id(where) == _python_ulid_event_id(where), where


def test_ulid_text_equals_python_ulid_for_random_bytes() -> None:
    """Any 16 bytes of a valid time part: the text python-ulid writes."""
    rng = random.Random(5)
    for _ in range(20_000):
        millis = rng.choice([rng.randint(0, MAX_MILLIS), 0, MAX_MILLIS])
        randomness = rng.choice([rng.randbytes(10), b"\x00" * 10, b"\xff" * 10])
        expected = str(ULID.from_bytes(millis.to_bytes(6, "big") + randomness))
        assert ulid_text(millis, randomness) == expected


def test_time_past_48_bits_raises_overflow_as_before() -> None:
    """A timestamp too large for a ULID fails as int.to_bytes(6) did."""
    too_late = Coordinates("t", 0, 0, MAX_MILLIS + 1)

    with pytest.raises(OverflowError):
        _python_ulid_event_id(too_late)
    with pytest.raises(OverflowError):
        derive_event_id(too_late)


def test_random_part_must_be_ten_bytes() -> None:
    with pytest.raises(ValueError, match="10 bytes"):
        ulid_text(0, b"\x00" * 9)
