"""Decoded records become Track API v2 batch entries: pure functions, no I/O.

Person records become ``identify`` entries and event records become ``event``
entries; a person tombstone may become a ``delete`` or ``suppress`` entry. The
rules, documented for users in ``docs/mapping.md``:

- The person is named by one identifier, ``email``, ``id`` or ``cio_id``, read
  from one record field (``person_email`` by default). An integer is accepted
  for ``id`` and sent as text.
- The fields an entry carries itself (the identifier, ``event_name``,
  ``event_id``, ``timestamp``) are not sent again as attributes. Of the
  free-form map's keys only the identifier's is left out.
- Every other field becomes an attribute (person) or event data (event). A
  null field or map value is left out, so an absent optional field never
  clears an attribute; inside arrays and other maps a null stays JSON null.
- A field holding a record is flattened: ``address: {city: "Oslo"}`` becomes the
  attribute ``address.city``. Maps and arrays stay JSON objects and arrays.
- The map field ``attributes`` (person) or ``data`` (event) is merged beside the
  named fields; a named field wins over a map key of the same name.
- Values become JSON by ``to_json``; timestamps (the event's ``timestamp``, a
  person's ``created_at``, Avro timestamp types and fields the reader schema
  marks ``"cio.timestamp"``) become integer Unix seconds by
  ``worker.timestamps``.
- An event's ``id`` is its ``event_id`` (a UUID is re-encoded as the ULID of the
  same 128 bits); when the record has none, a ULID is derived from the record's
  topic, partition, offset and timestamp, so a replay sends the same id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Literal
from uuid import UUID

from ulid import ULID

from worker.errors import ConfigError, ValidationError
from worker.jsontext import compact_flagged, non_finite
from worker.timestamps import UNITS, Unit, datetime_to_seconds, to_seconds
from worker.ulids import ulid_text

IdentifierType = Literal["email", "id", "cio_id"]

IDENTITY_FIELD = "person_email"
EVENT_NAME_FIELD = "event_name"
EVENT_ID_FIELD = "event_id"
TIMESTAMP_FIELD = "timestamp"
CREATED_AT_FIELD = "created_at"
ANONYMOUS_ID_FIELD = "anonymous_id"
ANONYMOUS_EVENT_PREFIX = b'{"type":"person","action":"event","anonymous_id":'
PERSON_MAP_FIELD = "attributes"
EVENT_MAP_FIELD = "data"
TIMESTAMP_MARKER = "cio.timestamp"
FLATTEN_SEPARATOR = "."

# Types to_json returns unchanged, checked by exact type (not a subclass).
_SCALARS = frozenset({str, int, float, bool})
_UUID_TEXT = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Coordinates:
    """Where a record came from, for derived ids and dead-letter headers."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class RecordShape:
    """What the reader schema says about a record's fields, read once.

    ``nested`` holds the fields whose type is a record (alone or beside null),
    which are flattened; ``timestamps`` the fields marked ``"cio.timestamp"``
    with the unit their numbers count.
    """

    nested: Mapping[str, RecordShape] = field(default_factory=dict)
    timestamps: Mapping[str, Unit] = field(default_factory=dict)

    @classmethod
    def of(cls, schema: Any) -> RecordShape:
        """The shape of a parsed record schema; raises ConfigError on a bad mark."""
        named = schema.get("__named_schemas", {}) if isinstance(schema, dict) else {}
        return _shape(schema, named, depth=0)


@dataclass(frozen=True, slots=True)
class TopicMapping:
    """How one topic's records name their person and which fields are special."""

    identifier_type: IdentifierType = "email"
    identifier_field: str = IDENTITY_FIELD
    shape: RecordShape = field(default_factory=RecordShape)


DEFAULT_MAPPING = TopicMapping()


def to_identify(
    record: dict[str, Any], mapping: TopicMapping = DEFAULT_MAPPING
) -> dict[str, Any]:
    """Map a person record to an ``identify`` entry."""
    identifiers = _identifiers(record, mapping)
    skip = {mapping.identifier_field}
    attributes = _attributes(record, PERSON_MAP_FIELD, skip, mapping)
    if CREATED_AT_FIELD in attributes:
        attributes[CREATED_AT_FIELD] = _created_at(record, attributes, mapping.shape)
    return {
        "type": "person",
        "action": "identify",
        "identifiers": identifiers,
        "attributes": attributes,
    }


def to_event(
    record: dict[str, Any],
    coordinates: Coordinates,
    mapping: TopicMapping = DEFAULT_MAPPING,
) -> dict[str, Any]:
    """Map an event record to an ``event`` entry with a name, id and timestamp.

    An event with no person identifier but an ``anonymous_id`` becomes an
    anonymous event: the entry carries ``anonymous_id`` where others carry
    ``identifiers``, and is sent to ``POST /api/v1/events`` (see
    ``anonymous_body``), since the v2 batch has no anonymous event.
    """
    identifiers = _event_identifiers(record, mapping)
    name = record.get(EVENT_NAME_FIELD)
    if not isinstance(name, str) or not name.strip():
        raise ValidationError(
            "missing_event_name", "event_name is missing or blank", EVENT_NAME_FIELD
        )
    skip = {mapping.identifier_field, EVENT_NAME_FIELD, EVENT_ID_FIELD, TIMESTAMP_FIELD}
    if ANONYMOUS_ID_FIELD in identifiers:
        skip.add(ANONYMOUS_ID_FIELD)
    entry: dict[str, Any] = {
        "type": "person",
        "action": "event",
        **identifiers,
        "name": name,
        "id": _event_id(record.get(EVENT_ID_FIELD)) or derive_event_id(coordinates),
        "attributes": _attributes(record, EVENT_MAP_FIELD, skip, mapping),
    }
    timestamp = record.get(TIMESTAMP_FIELD)
    if timestamp is not None:
        unit = mapping.shape.timestamps.get(TIMESTAMP_FIELD, "seconds")
        entry["timestamp"] = to_seconds(timestamp, TIMESTAMP_FIELD, unit)
    return entry


def to_person_action(
    key: bytes | None, action: str, mapping: TopicMapping = DEFAULT_MAPPING
) -> dict[str, Any]:
    """A ``delete`` or ``suppress`` entry for the person a tombstone's key names.

    The key must be the identifier itself as UTF-8 text, as producers that key
    person records by email do.
    """
    kind = mapping.identifier_type
    try:
        identifier = (key or b"").decode("utf-8")
    except UnicodeDecodeError:
        identifier = ""
    if not identifier.strip():
        raise ValidationError(
            "missing_identifier",
            f"a tombstone's key must be the person's {kind} as UTF-8 text, to "
            f"{action} that person",
            "key",
        )
    return {"type": "person", "action": action, "identifiers": {kind: identifier}}


def derive_event_id(coordinates: Coordinates) -> str:
    """A ULID fixed by the record's coordinates: same record, same id.

    The time part is the record's Kafka timestamp; the random part is the first
    80 bits of a SHA-256 of topic, partition and offset.
    """
    key = f"{coordinates.topic}\x00{coordinates.partition}\x00{coordinates.offset}"
    digest = hashlib.sha256(key.encode()).digest()[:10]
    # Written directly: the same characters as str(ULID.from_bytes(millis +
    # digest)) at a third of the cost.
    return ulid_text(max(coordinates.timestamp_ms, 0), digest)


def serialize(entry: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of one entry; NaN and infinities are refused."""
    data, flagged = compact_flagged(entry)
    if flagged and any(
        True for key, value in entry.items() for _ in non_finite(value, key)
    ):
        raise ValidationError(
            "not_finite", "a value is NaN or infinite, which JSON cannot carry"
        )
    return data


def to_json(value: Any, field: str) -> Any:
    """One decoded Avro value as JSON data: the one conversion rule.

    Strings, booleans, integers, floats and null stay as they are (a float that
    is not finite is left for ``worker.limits`` to refuse, beside every other
    problem); maps and nested records become objects and arrays stay arrays;
    bytes and fixed become standard base64 text; a decimal becomes the text of
    its exact value (``"12.30"``); a UUID its canonical text; a date
    ``"YYYY-MM-DD"``; a time of day ``"HH:MM:SS[.ffffff]"``; a timestamp integer
    Unix seconds, checked by ``worker.timestamps``.
    """
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, dict):
        return {k: to_json(v, f"{field}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return to_seconds(datetime_to_seconds(value), field)
    if isinstance(value, date | time):
        return value.isoformat()
    raise ValidationError(
        "unsupported_value",
        f"{field} holds a {type(value).__name__}, which has no JSON form",
        field,
    )


def _identifiers(record: dict[str, Any], mapping: TopicMapping) -> dict[str, str]:
    name = mapping.identifier_field
    value = record.get(name)
    if mapping.identifier_type == "id" and type(value) is int:
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValidationError("missing_identifier", f"{name} is missing or empty", name)
    return {mapping.identifier_type: value}


def _event_identifiers(record: dict[str, Any], mapping: TopicMapping) -> dict[str, Any]:
    """The entry's ``identifiers``, or ``anonymous_id`` for an anonymous event.

    The person's identifier wins when the record has both; without it, a
    non-blank ``anonymous_id`` makes the event anonymous.
    """
    try:
        return {"identifiers": _identifiers(record, mapping)}
    except ValidationError:
        anonymous = record.get(ANONYMOUS_ID_FIELD)
        if not isinstance(anonymous, str) or not anonymous.strip():
            raise
    return {ANONYMOUS_ID_FIELD: anonymous}


def is_anonymous(entry: bytes) -> bool:
    """True for the serialized entry of an anonymous event.

    ``to_event`` puts ``anonymous_id`` third, where every other entry has
    ``identifiers``, so the serialized entry starts with this exact prefix.
    """
    return entry.startswith(ANONYMOUS_EVENT_PREFIX)


def anonymous_body(entry: bytes) -> bytes:
    """The ``POST /api/v1/events`` body of an anonymous event's entry.

    The v1 body names the event data ``data`` where the v2 entry says
    ``attributes``; everything else is carried over unchanged.
    """
    parsed = json.loads(entry)
    body: dict[str, Any] = {
        ANONYMOUS_ID_FIELD: parsed[ANONYMOUS_ID_FIELD],
        "name": parsed["name"],
        "id": parsed["id"],
    }
    if "timestamp" in parsed:
        body["timestamp"] = parsed["timestamp"]
    body["data"] = parsed.get("attributes", {})
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _event_id(value: Any) -> Any:
    """The given event id; a UUID becomes the ULID of the same 128 bits."""
    if isinstance(value, str) and _UUID_TEXT.fullmatch(value):
        value = UUID(value)
    if isinstance(value, UUID):
        return str(ULID.from_uuid(value))
    return value


def _attributes(
    record: dict[str, Any], map_field: str, skip: set[str], mapping: TopicMapping
) -> dict[str, Any]:
    """The map's entries, then the named fields (flattened) over them.

    Of the map's keys only the identifier's is left out: the other names an
    entry carries (``timestamp``, ...) are ordinary data inside the map.
    """
    values: dict[str, Any] = {}
    extra = record.get(map_field)
    if isinstance(extra, dict):
        identifier = mapping.identifier_field
        for key, value in extra.items():
            if value is None or key == identifier:
                continue
            if type(value) in _SCALARS:  # most values: to_json keeps them as is
                values[key] = value
            else:
                values[key] = to_json(value, f"{map_field}.{key}")
    _flatten(record, mapping.shape, "", skip | {map_field}, values)
    return values


def _flatten(
    record: dict[str, Any],
    shape: RecordShape,
    prefix: str,
    skip: set[str],
    out: dict[str, Any],
) -> None:
    nested_shapes, stamps = shape.nested, shape.timestamps
    for key, value in record.items():
        if value is None or key in skip:
            continue
        name = prefix + key
        nested = nested_shapes.get(key) if nested_shapes else None
        if nested is not None and isinstance(value, dict):
            _flatten(value, nested, name + FLATTEN_SEPARATOR, set(), out)
        elif key in stamps:
            out[name] = to_seconds(value, name, stamps[key])
        elif type(value) in _SCALARS:  # most values: to_json keeps them as is
            out[name] = value
        else:
            out[name] = to_json(value, name)


def _created_at(
    record: dict[str, Any], attributes: dict[str, Any], shape: RecordShape
) -> int:
    """``created_at`` is a Customer.io timestamp, from a field or the map."""
    value = attributes[CREATED_AT_FIELD]
    if (
        record.get(CREATED_AT_FIELD) is not None
        and CREATED_AT_FIELD in shape.timestamps
    ):
        return int(value)  # the marked field was converted by its own unit
    return to_seconds(value, CREATED_AT_FIELD)


MAX_SHAPE_DEPTH = 32  # deeper nesting than this is a recursive type: not flattened


def _shape(schema: Any, named: dict[str, Any], depth: int) -> RecordShape:
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return RecordShape()
    nested: dict[str, RecordShape] = {}
    timestamps: dict[str, Unit] = {}
    for avro_field in schema.get("fields", []):
        name = avro_field["name"]
        mark = avro_field.get(TIMESTAMP_MARKER)
        if mark is not None:
            if mark not in UNITS:
                raise ConfigError(
                    f'field {name} is marked "{TIMESTAMP_MARKER}": {mark!r}; the '
                    f"mark must be one of {', '.join(UNITS)}"
                )
            timestamps[name] = mark
        record_type = _record_branch(avro_field["type"], named)
        if record_type is not None and depth < MAX_SHAPE_DEPTH:
            nested[name] = _shape(record_type, named, depth + 1)
    return RecordShape(nested, timestamps)


def _record_branch(avro_type: Any, named: dict[str, Any]) -> Any:
    """The record type of a field typed as a record, or as null and a record."""
    if isinstance(avro_type, list):
        branches = [b for b in avro_type if b != "null"]
        if len(branches) != 1:
            return None
        avro_type = branches[0]
    if isinstance(avro_type, str):
        avro_type = named.get(avro_type)
    if isinstance(avro_type, dict) and avro_type.get("type") == "record":
        return avro_type
    return None
