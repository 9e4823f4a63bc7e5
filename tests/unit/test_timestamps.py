"""Unit tests of worker.timestamps: every shape of time to integer Unix seconds."""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest

from worker.errors import ValidationError
from worker.timestamps import MAX_SECONDS, MIN_SECONDS, Unit, to_seconds

T = 1_700_000_000  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        (T, "seconds", T),
        (float(T) + 0.999, "seconds", T),
        (T * 1000 + 999, "milliseconds", T),
        (T * 1000.0 + 999.5, "milliseconds", T),
        (str(T), "seconds", T),
        (f" {T} ", "seconds", T),
        (f"+{T}", "seconds", T),
        (str(T * 1000), "milliseconds", T),
        ("2023-11-14T22:13:20Z", "seconds", T),
        ("2023-11-14T22:13:20.999Z", "seconds", T),
        ("2023-11-14T23:13:20+01:00", "seconds", T),
        ("2023-11-14T17:13:20-05:00", "seconds", T),
        ("2023-11-14T22:13:20", "seconds", T),  # no zone: UTC
        ("2023-11-14 22:13:20", "seconds", T),
        ("20231114T221320Z", "seconds", T),
        ("2023-11-14", "seconds", T - 22 * 3600 - 13 * 60 - 20),  # midnight UTC
        ("2023-11-14T22:13:20Z", "milliseconds", T),  # text ignores the unit
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), "seconds", T),
        (datetime(2023, 11, 14, 22, 13, 20, 999_999, tzinfo=UTC), "seconds", T),
        (datetime(2023, 11, 14, 22, 13, 20), "seconds", T),  # naive: UTC
        (
            datetime(2023, 11, 15, 0, 13, 20, tzinfo=timezone(timedelta(hours=2))),
            "seconds",
            T,
        ),
        (date(2023, 11, 14), "seconds", T - 80_000),
        (MIN_SECONDS, "seconds", MIN_SECONDS),
        (MAX_SECONDS, "seconds", MAX_SECONDS),
    ],
)
def test_to_seconds_readable_value_returns_unix_seconds(
    value: Any, unit: Unit, expected: int
) -> None:
    """Seconds, milliseconds, ISO-8601 text and datetimes become whole seconds."""
    seconds = to_seconds(value, "timestamp", unit)

    assert seconds == expected
    assert type(seconds) is int


@pytest.mark.parametrize(
    ("value", "unit", "reason"),
    [
        (0, "seconds", "timestamp_too_small"),
        (-1, "seconds", "timestamp_too_small"),
        (-T, "seconds", "timestamp_too_small"),
        (MIN_SECONDS - 1, "seconds", "timestamp_too_small"),
        ("0", "seconds", "timestamp_too_small"),
        ("1970-01-01T00:00:00Z", "seconds", "timestamp_too_small"),
        ("1999-12-31T23:59:59Z", "seconds", "timestamp_too_small"),
        (T * 1000, "seconds", "timestamp_too_large"),  # milliseconds in seconds
        (T * 1_000_000, "seconds", "timestamp_too_large"),  # microseconds
        (T * 1_000_000, "milliseconds", "timestamp_too_large"),
        (MAX_SECONDS + 1, "seconds", "timestamp_too_large"),
        (float(T) * 1000, "seconds", "timestamp_too_large"),
        ("1700000000000", "seconds", "timestamp_too_large"),
        ("yesterday", "seconds", "invalid_timestamp"),
        ("", "seconds", "invalid_timestamp"),
        ("2023-13-45T00:00:00Z", "seconds", "invalid_timestamp"),
        ("1.7e9", "seconds", "invalid_timestamp"),
        (math.nan, "seconds", "invalid_timestamp"),
        (math.inf, "seconds", "invalid_timestamp"),
        (-math.inf, "milliseconds", "invalid_timestamp"),
        (True, "seconds", "invalid_timestamp"),
        (b"1700000000", "seconds", "invalid_timestamp"),
        ([T], "seconds", "invalid_timestamp"),
        ({"seconds": T}, "seconds", "invalid_timestamp"),
    ],
)
def test_to_seconds_unreadable_or_implausible_value_raises(
    value: Any, unit: Unit, reason: str
) -> None:
    """A value that cannot be read or is out of range is refused, never guessed."""
    with pytest.raises(ValidationError) as caught:
        to_seconds(value, "created_at", unit)

    assert caught.value.reason == reason
    assert caught.value.field == "created_at"
    assert caught.value.stage == "validate"
    assert "created_at" in caught.value.message


def test_to_seconds_milliseconds_message_says_what_to_fix() -> None:
    """A millisecond value in a seconds field names the unit and the schema mark."""
    with pytest.raises(ValidationError) as caught:
        to_seconds(1_700_000_000_000, "timestamp")

    assert "milliseconds" in caught.value.message
    assert "cio.timestamp" in caught.value.message


def test_to_seconds_zero_message_suggests_null() -> None:
    """A zero is refused with advice to send null for an unknown time."""
    with pytest.raises(ValidationError) as caught:
        to_seconds(0, "timestamp")

    assert "null" in caught.value.message


def test_to_seconds_long_text_is_shortened_in_message() -> None:
    """An unreadable long string is quoted shortened, not in full."""
    with pytest.raises(ValidationError) as caught:
        to_seconds("x" * 5000, "timestamp")

    assert len(caught.value.message) < 300


@pytest.mark.parametrize("unit", ["seconds", "milliseconds"])
@pytest.mark.parametrize(
    "value",
    [MIN_SECONDS - 1, MIN_SECONDS, T, MAX_SECONDS, MAX_SECONDS + 1, 0, -T, True,
     MIN_SECONDS * 1000, MAX_SECONDS * 1000 + 999, float(T), str(T)],
)  # fmt: skip
def test_to_seconds_integers_in_range_take_the_short_path_to_the_same_answer(
    value: Any, unit: Unit
) -> None:
    """The short path for plain in-range integers answers as the general rule."""
    from worker.timestamps import _read_seconds

    try:
        seconds = _read_seconds(value, "t", unit)
        expected: Any = seconds if MIN_SECONDS <= seconds <= MAX_SECONDS else "error"
    except ValidationError:
        expected = "error"
    try:
        actual: Any = to_seconds(value, "t", unit)
    except ValidationError:
        actual = "error"

    assert actual == expected
    assert type(actual) is type(expected)
