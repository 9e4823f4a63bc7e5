"""Decoded records become Track API v2 batch entries: pure functions, no I/O.

Person records become ``identify`` entries and event records become ``event``
entries, both keyed by the person's email. Mapping rules:

- ``person_email`` is the identifier and is never sent as an attribute.
- Every other field becomes an attribute (person) or event data (event); a field
  whose value is null is left out, so an absent optional field never clears an
  attribute Customer.io already holds.
- The map field ``attributes`` (person) or ``data`` (event) is merged beside the
  other fields, so producers can send free-form keys; a named field wins over a
  map key of the same name.
- An event's ``id`` is its ``event_id``; when the record has none, a ULID is
  derived from the record's topic, partition, offset and timestamp, so a
  replay of the same record sends the same id and Customer.io drops the repeat.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ulid import ULID

from worker.errors import ValidationError

IDENTITY_FIELD = "person_email"
EVENT_NAME_FIELD = "event_name"
EVENT_ID_FIELD = "event_id"
TIMESTAMP_FIELD = "timestamp"
PERSON_MAP_FIELD = "attributes"
EVENT_MAP_FIELD = "data"


@dataclass(frozen=True, slots=True)
class Coordinates:
    """Where a record came from, for derived ids and dead-letter headers."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


def to_identify(record: dict[str, Any]) -> dict[str, Any]:
    """Map a person record to an ``identify`` entry."""
    email = _identity(record)
    attributes = _collect(record, PERSON_MAP_FIELD, skip={IDENTITY_FIELD})
    return {
        "type": "person",
        "action": "identify",
        "identifiers": {"email": email},
        "attributes": attributes,
    }


def to_event(record: dict[str, Any], coordinates: Coordinates) -> dict[str, Any]:
    """Map an event record to an ``event`` entry with a name, id and timestamp."""
    email = _identity(record)
    name = record.get(EVENT_NAME_FIELD)
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(
            "missing_event_name", "event_name is missing or blank", EVENT_NAME_FIELD
        )
    skip = {IDENTITY_FIELD, EVENT_NAME_FIELD, EVENT_ID_FIELD, TIMESTAMP_FIELD}
    entry: dict[str, Any] = {
        "type": "person",
        "action": "event",
        "identifiers": {"email": email},
        "name": name,
        "id": record.get(EVENT_ID_FIELD) or derive_event_id(coordinates),
        "attributes": _collect(record, EVENT_MAP_FIELD, skip=skip),
    }
    timestamp = record.get(TIMESTAMP_FIELD)
    if timestamp is not None:
        entry["timestamp"] = timestamp
    return entry


def derive_event_id(coordinates: Coordinates) -> str:
    """A ULID fixed by the record's coordinates: same record, same id.

    The time part is the record's Kafka timestamp; the random part is the first
    80 bits of a SHA-256 of topic, partition and offset.
    """
    key = f"{coordinates.topic}\x00{coordinates.partition}\x00{coordinates.offset}"
    digest = hashlib.sha256(key.encode()).digest()[:10]
    millis = max(coordinates.timestamp_ms, 0).to_bytes(6, "big")
    return str(ULID.from_bytes(millis + digest))


def serialize(entry: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of one entry; NaN and infinities are refused."""
    try:
        return json.dumps(
            entry, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except ValueError as exc:
        raise ValidationError(
            "not_finite", "a value is NaN or infinite, which JSON cannot carry"
        ) from exc


def _identity(record: dict[str, Any]) -> str:
    email = record.get(IDENTITY_FIELD)
    if not isinstance(email, str) or not email.strip():
        raise ValidationError(
            "missing_identifier", "person_email is missing or empty", IDENTITY_FIELD
        )
    return email


def _collect(record: dict[str, Any], map_field: str, skip: set[str]) -> dict[str, Any]:
    extra = record.get(map_field)
    values: dict[str, Any] = {}
    if isinstance(extra, dict):
        values.update((k, v) for k, v in extra.items() if v is not None)
    for key, value in record.items():
        if key in skip or key == map_field or value is None:
            continue
        values[key] = value
    return values
