"""Customer.io's Track API limits, checked before an entry is sent.

Every size is UTF-8 bytes: of a string value itself, of the compact JSON of any
other value, and of the compact JSON of a whole entry as it is sent. Customer.io
documents each entry as "32 kb or less"; 32,000 bytes is the stricter reading,
so an entry that passes here passes under either. One entry is checked against
every limit at once, so the dead letter names all that are broken, not only the
first: the error's ``reason`` and ``field`` are the first problem's (in entry
order) and its message lists them all.

Attribute count, name and value limits apply to a person's attributes; an
event's data is limited only in total, as Customer.io documents.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker.errors import ValidationError
from worker.jsontext import compact, compact_flagged, non_finite

MAX_ENTRY_BYTES = 32_000
MAX_IDENTIFIER_BYTES = 150
MAX_ATTRIBUTES = 300
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1_000
MAX_ATTRIBUTES_BYTES = 100_000
MAX_EVENT_NAME_BYTES = 100
MAX_EVENT_DATA_BYTES = 100_000
# Problems spelled out in one message; the rest are counted. Dead-letter
# messages are cut at 1,000 characters anyway.
MAX_LISTED_PROBLEMS = 8

_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}", re.IGNORECASE)
# A character takes at most 4 bytes in UTF-8: names this short need no encoding.
_SAFE_NAME_CHARS = MAX_ATTRIBUTE_NAME_BYTES // 4


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken limit: a stable reason, the entry path at fault, in words."""

    reason: str
    field: str | None
    message: str


class LimitsError(ValidationError):
    """An entry breaks one or more limits; ``problems`` lists every one."""

    def __init__(self, problems: list[Problem]) -> None:
        first = problems[0]
        listed = "; ".join(
            f"{p.reason} at {p.field or 'entry'}: {p.message}"
            for p in problems[:MAX_LISTED_PROBLEMS]
        )
        more = len(problems) - MAX_LISTED_PROBLEMS
        if more > 0:
            listed += f"; and {more} more"
        count = f"{len(problems)} limits broken: " if len(problems) > 1 else ""
        super().__init__(first.reason, count + listed, first.field)
        self.problems = tuple(problems)


def checked_entry(entry: dict[str, Any]) -> bytes:
    """Serialize an entry as sent, or raise LimitsError naming every broken limit."""
    data, flagged = compact_flagged(entry)
    problems = list(_entry_problems(entry, len(data)))
    if flagged:  # cheap test, exact look below
        problems.extend(
            Problem("not_finite", path, f"{value} is not a number JSON can carry")
            for key, item in entry.items()
            for path, value in non_finite(item, key)
        )
    if len(data) > MAX_ENTRY_BYTES:
        problems.append(
            Problem(
                "entry_too_large",
                None,
                f"{len(data):,} bytes, at most {MAX_ENTRY_BYTES:,}",
            )
        )
    if problems:
        raise LimitsError(problems)
    return data


def check_entry_size(entry_bytes: bytes) -> None:
    """Raise ValidationError when a serialized entry is over the per-entry limit."""
    if len(entry_bytes) > MAX_ENTRY_BYTES:
        raise ValidationError(
            "entry_too_large",
            f"the entry is {len(entry_bytes)} bytes; Customer.io takes at most "
            f"{MAX_ENTRY_BYTES}",
        )


def utf8_size(value: Any) -> int:
    """Bytes of a value: UTF-8 of a string, compact JSON of anything else."""
    if isinstance(value, str):
        return len(value.encode())
    # Short cuts that equal the written JSON for the common scalars, which are
    # most attribute values; everything else is measured by writing it.
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if type(value) is int:
        return len(str(value))
    return len(compact(value))


def _entry_problems(entry: dict[str, Any], entry_size: int) -> Iterator[Problem]:
    for kind, value in (entry.get("identifiers") or {}).items():
        yield from _too_long(
            "identifier_too_long", f"identifiers.{kind}", value, MAX_IDENTIFIER_BYTES
        )
    if "anonymous_id" in entry:
        yield from _too_long(
            "identifier_too_long", "anonymous_id", entry["anonymous_id"],
            MAX_IDENTIFIER_BYTES,
        )  # fmt: skip
    attributes = entry.get("attributes") or {}
    if entry.get("action") == "event":
        yield from _event_problems(entry, attributes, entry_size)
    elif entry.get("action") == "identify":
        yield from _attribute_problems(attributes, entry_size)


def _event_problems(
    entry: dict[str, Any], data: dict[str, Any], entry_size: int
) -> Iterator[Problem]:
    yield from _too_long(
        "event_name_too_long", "name", entry.get("name", ""), MAX_EVENT_NAME_BYTES
    )
    event_id = entry.get("id")
    if not isinstance(event_id, str) or not _ULID.fullmatch(event_id):
        yield Problem(
            "invalid_event_id",
            "id",
            f"{str(event_id)[:40]!r} is not a ULID (26 characters of Crockford "
            "base32), which Customer.io requires to drop repeats",
        )
    # The data's JSON is part of the entry's, so it can only be over its limit
    # when the entry is: measuring it costs one more dump only then.
    if entry_size > MAX_EVENT_DATA_BYTES:
        size = len(compact(data))
        if size > MAX_EVENT_DATA_BYTES:
            yield Problem(
                "event_data_too_large",
                "attributes",
                f"{size:,} bytes, at most {MAX_EVENT_DATA_BYTES:,}",
            )


def _attribute_problems(
    attributes: dict[str, Any], entry_size: int
) -> Iterator[Problem]:
    if len(attributes) > MAX_ATTRIBUTES:
        yield Problem(
            "too_many_attributes",
            "attributes",
            f"{len(attributes):,} attributes, at most {MAX_ATTRIBUTES}",
        )
    # A value's size is at most its JSON's, which is part of the entry's: in an
    # entry of 1,000 bytes or less no value can be too long, so most entries
    # skip measuring values. A name of few characters cannot be too long either.
    measure_values = entry_size > MAX_ATTRIBUTE_VALUE_BYTES
    for name, value in attributes.items():
        if len(name) > _SAFE_NAME_CHARS:
            yield from _too_long(
                "attribute_name_too_long",
                f"attributes.{_short(name)}",
                name,
                MAX_ATTRIBUTE_NAME_BYTES,
            )
        if measure_values:
            yield from _too_long(
                "attribute_value_too_long",
                f"attributes.{_short(name)}",
                value,
                MAX_ATTRIBUTE_VALUE_BYTES,
            )
    if entry_size > MAX_ATTRIBUTES_BYTES:
        size = len(compact(attributes))
        if size > MAX_ATTRIBUTES_BYTES:
            yield Problem(
                "attributes_too_large",
                "attributes",
                f"{size:,} bytes, at most {MAX_ATTRIBUTES_BYTES:,}",
            )


def _too_long(reason: str, field: str, value: Any, limit: int) -> Iterator[Problem]:
    if type(value) is str and len(value) * 4 <= limit:
        return  # at most 4 bytes a character: too short to be over, not measured
    size = utf8_size(value)
    if size > limit:
        yield Problem(reason, field, f"{size:,} bytes, at most {limit:,}")


def _short(name: str) -> str:
    return name if len(name) <= 60 else name[:57] + "..."
