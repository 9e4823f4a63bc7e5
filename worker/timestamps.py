"""Timestamps to integer Unix seconds: one rule for every shape a producer sends.

Customer.io reads every timestamp as integer Unix seconds; milliseconds and
ISO-8601 text are taken for other values (or ignored) without an error. So each
timestamp is normalised here, and one that cannot be read, or whose value is
implausible, is refused with a reason instead of being guessed at or replaced by
"now". The rule, documented for users in ``docs/mapping.md``:

- an integer is in the field's unit: seconds, unless the reader schema marks
  the field ``"cio.timestamp": "milliseconds"``;
- a finite float is in the same unit and rounded down to a whole second;
- a string of ASCII digits (optionally signed) is read as that integer;
- any other string is ISO-8601 (``datetime.fromisoformat``): with a zone or
  offset it is converted to UTC, without one it is taken as UTC, and a bare
  date is midnight UTC;
- a datetime (Avro ``timestamp-*`` and ``local-timestamp-*``) is converted the
  same way, and a date (Avro ``date``) is midnight UTC;
- the result must lie in 1,000,000,000 .. 99,999,999,999 (2001-09-09T01:46:40Z
  to the year 5138), the range Customer.io's Ruby client accepts. Zero, negative
  numbers and anything earlier are refused as ``timestamp_too_small``, since a
  zero is nearly always an unset value; larger numbers are refused as
  ``timestamp_too_large``, since they are nearly always milliseconds or
  microseconds in a seconds field.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

from worker.errors import ValidationError

Unit = Literal["seconds", "milliseconds"]
UNITS: tuple[Unit, ...] = ("seconds", "milliseconds")

# Customer.io's Ruby client refuses timestamps outside 999,999,999 < t <
# 100,000,000,000: ten or eleven digits of seconds. The same bounds here keep
# millisecond values (13 digits today) and placeholder zeros out.
MIN_SECONDS = 1_000_000_000
MAX_SECONDS = 99_999_999_999

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


def to_seconds(value: Any, field: str, unit: Unit = "seconds") -> int:
    """Return ``value`` as plausible integer Unix seconds, or raise ValidationError.

    ``field`` names the record field in the error; ``unit`` is what a bare number
    counts. Reasons: ``invalid_timestamp``, ``timestamp_too_small``,
    ``timestamp_too_large``.
    """
    if type(value) is int and unit == "seconds" and MIN_SECONDS <= value <= MAX_SECONDS:
        return value  # the common case, decided without the general reading
    seconds = _read_seconds(value, field, unit)
    if seconds < MIN_SECONDS:
        raise ValidationError(
            "timestamp_too_small",
            f"{field} is {seconds} Unix seconds; 0, negative values and times "
            "before 2001-09-09 are refused (send null when the time is unknown)",
            field,
        )
    if seconds > MAX_SECONDS:
        raise ValidationError(
            "timestamp_too_large",
            f"{field} is {seconds} Unix seconds, after the year 5138: it looks "
            "like milliseconds; send seconds, or mark the field "
            '"cio.timestamp": "milliseconds" in the reader schema',
            field,
        )
    return seconds


def datetime_to_seconds(moment: datetime) -> int:
    """Whole Unix seconds of a datetime, rounded down; a naive one is UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _SECOND


def _read_seconds(value: Any, field: str, unit: Unit) -> int:
    if isinstance(value, bool):
        raise _unreadable(value, field, "a boolean is not a time")
    if isinstance(value, int):
        return value // 1000 if unit == "milliseconds" else value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _unreadable(value, field, "not a finite number")
        return math.floor(value / 1000 if unit == "milliseconds" else value)
    if isinstance(value, datetime):
        return datetime_to_seconds(value)
    if isinstance(value, date):
        return datetime_to_seconds(datetime(value.year, value.month, value.day))
    if isinstance(value, str):
        return _parse_text(value.strip(), field, unit)
    raise _unreadable(value, field, f"a {type(value).__name__} is not a time")


def _parse_text(text: str, field: str, unit: Unit) -> int:
    if _INTEGER_TEXT.fullmatch(text):
        return _read_seconds(int(text), field, unit)
    try:
        return datetime_to_seconds(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        raise _unreadable(
            text, field, "text must be ISO-8601, e.g. 2024-05-01T12:00:00Z"
        ) from None


def _unreadable(value: Any, field: str, why: str) -> ValidationError:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ValidationError("invalid_timestamp", f"{field} is {shown}: {why}", field)
