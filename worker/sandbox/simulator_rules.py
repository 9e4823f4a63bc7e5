"""Entry validation rules of the Track API simulator.

Each rule group is a pure function that returns a list of error dicts with the keys
``reason``, ``field`` and ``message``; an empty list means the part is valid. The
simulator adds ``batch_index`` itself. Reasons used here:

- ``invalid``: wrong JSON type or format (not an object, not an integer, bad ULID);
- ``required``: a mandatory part is missing or blank;
- ``too_long`` / ``too_many``: a size or count limit is exceeded;
- ``entry_too_large``, ``unsupported_type``, ``unsupported_action``: envelope errors.

Sizes are UTF-8 byte counts, because the Track API limits bytes, not characters.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

ErrorDict = dict[str, str]

IDENTIFIER_TYPES = ("id", "email", "cio_id")
ACTIONS = frozenset({"identify", "event", "delete", "suppress"})
MAX_IDENTIFIER_BYTES = 150
MAX_ATTRIBUTES = 300
MAX_ATTRIBUTE_NAME_BYTES = 150
MAX_ATTRIBUTE_VALUE_BYTES = 1000
MAX_DATA_BYTES = 100_000
MAX_EVENT_NAME_BYTES = 100
_ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$", re.IGNORECASE)
# Text of at most this many characters cannot be over the limit in UTF-8 bytes
# (4 bytes a character at most), so it is not measured.
_SAFE_NAME_CHARS = MAX_ATTRIBUTE_NAME_BYTES // 4
_SAFE_VALUE_CHARS = MAX_ATTRIBUTE_VALUE_BYTES // 4


def compact_json(value: Any) -> str:
    """Serialize ``value`` the way sizes are measured: no spaces, raw non-ASCII."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_size(value: Any) -> int:
    """UTF-8 bytes of ``compact_json(value)``, by orjson where it can (the same
    text up to the spelling of some floats, at a tenth of the cost); raises
    UnicodeEncodeError for text UTF-8 cannot carry (lone surrogates)."""
    try:
        return len(orjson.dumps(value))
    except TypeError:  # integers beyond 64 bits, lone surrogates
        return utf8_len(compact_json(value))


def utf8_len(text: str) -> int:
    """Return the UTF-8 byte length of ``text`` (callers ensure it is encodable)."""
    return len(text.encode("utf-8"))


def value_size(value: Any) -> int:
    """Size of an attribute value: UTF-8 length for strings, compact JSON otherwise."""
    if isinstance(value, str):
        return utf8_len(value)
    return json_size(value)


def error(reason: str, field: str, message: str) -> ErrorDict:
    """Build one error dict; kept tiny so every rule reports the same shape."""
    return {"reason": reason, "field": field, "message": message}


def check_envelope(entry: Any, max_entry_bytes: int) -> list[ErrorDict]:
    """Check shape, size, type and action; later rules assume these hold.

    Size comes first so an oversized entry is refused without deeper inspection,
    and an entry with unencodable text (lone surrogates) is refused as invalid.
    """
    if not isinstance(entry, dict):
        return [error("invalid", "entry", "batch entry must be an object")]
    try:
        size = json_size(entry)
    except UnicodeEncodeError:
        return [error("invalid", "entry", "batch entry must be valid UTF-8")]
    if size > max_entry_bytes:
        message = f"entry cannot be longer than {max_entry_bytes} bytes ({size})"
        return [error("entry_too_large", "entry", message)]
    if entry.get("type") != "person":
        return [error("unsupported_type", "type", "type must be 'person'")]
    if entry.get("action") not in ACTIONS:
        allowed = ", ".join(sorted(ACTIONS))
        return [
            error("unsupported_action", "action", f"action must be one of {allowed}")
        ]
    return []


def identifier_of(identifiers: dict[str, Any]) -> tuple[str, str]:
    """Return (type, value) of valid identifiers; call only after the rule passed."""
    kind = next(k for k in IDENTIFIER_TYPES if k in identifiers)
    return kind, identifiers[kind]


def check_identifiers(identifiers: Any) -> list[ErrorDict]:
    """Require an object holding exactly one of id, email, cio_id as a short string."""
    if identifiers is None:
        return [error("required", "identifiers", "identifiers are required")]
    if not isinstance(identifiers, dict):
        return [error("invalid", "identifiers", "identifiers must be a hash")]
    unknown = sorted(k for k in identifiers if k not in IDENTIFIER_TYPES)
    if unknown:
        message = f"unsupported identifier '{unknown[0]}'; use id, email or cio_id"
        return [error("invalid", f"identifiers.{unknown[0]}", message)]
    if len(identifiers) != 1:
        message = "identifiers must contain exactly one of id, email, cio_id"
        reason = "required" if not identifiers else "invalid"
        return [error(reason, "identifiers", message)]
    kind, value = identifier_of(identifiers)
    field = f"identifiers.{kind}"
    if not isinstance(value, str):
        return [error("invalid", field, f"{kind} attribute must be a string")]
    if value == "":
        return [error("invalid", field, f"{kind} attribute cannot be an empty string")]
    if utf8_len(value) > MAX_IDENTIFIER_BYTES:
        message = f"{kind} attribute cannot be longer than {MAX_IDENTIFIER_BYTES} bytes"
        return [error("too_long", field, message)]
    return []


def check_profile_attributes(attributes: Any) -> list[ErrorDict]:
    """Apply the identify limits: key count, name size, value size, total size."""
    if not isinstance(attributes, dict):
        return [error("invalid", "attributes", "attributes must be a hash")]
    if len(attributes) > MAX_ATTRIBUTES:
        message = (
            f"cannot identify more than {MAX_ATTRIBUTES} attributes in one request"
        )
        return [error("too_many", "attributes", message)]
    errors: list[ErrorDict] = []
    for name, value in attributes.items():
        field = f"attributes.{name}"
        if len(name) > _SAFE_NAME_CHARS and utf8_len(name) > MAX_ATTRIBUTE_NAME_BYTES:
            message = (
                f"attribute name cannot be longer than {MAX_ATTRIBUTE_NAME_BYTES} bytes"
            )
            errors.append(error("too_long", field, message))
        elif (type(value) is not str or len(value) > _SAFE_VALUE_CHARS) and value_size(
            value
        ) > MAX_ATTRIBUTE_VALUE_BYTES:
            message = (
                f"value for attribute '{name}' cannot be longer than "
                f"{MAX_ATTRIBUTE_VALUE_BYTES} bytes"
            )
            errors.append(error("too_long", field, message))
    if not errors and json_size(attributes) > MAX_DATA_BYTES:
        message = f"attributes cannot be longer than {MAX_DATA_BYTES} bytes"
        errors.append(error("too_long", "attributes", message))
    return errors


def check_timestamp(entry: dict[str, Any]) -> list[ErrorDict]:
    """An optional ``timestamp`` must be an integer (a JSON bool is not one)."""
    if "timestamp" not in entry:
        return []
    value = entry["timestamp"]
    if isinstance(value, bool) or not isinstance(value, int):
        return [error("invalid", "timestamp", "timestamp must be an integer")]
    return []


def check_event_name(entry: dict[str, Any]) -> list[ErrorDict]:
    """The event ``name`` must be a non-blank string of at most 100 UTF-8 bytes."""
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        return [error("invalid", "name", "event name must be a string")]
    if name is None or not name.strip():
        return [error("required", "name", "event name must not be blank")]
    if utf8_len(name) > MAX_EVENT_NAME_BYTES:
        message = f"event name cannot be longer than {MAX_EVENT_NAME_BYTES} bytes"
        return [error("too_long", "name", message)]
    return []


def check_event_data(entry: dict[str, Any]) -> list[ErrorDict]:
    """Optional event data (``attributes``) must be an object of bounded size."""
    if "attributes" not in entry:
        return []
    data = entry["attributes"]
    if not isinstance(data, dict):
        return [error("invalid", "attributes", "event data must be a hash")]
    if json_size(data) > MAX_DATA_BYTES:
        message = f"event data cannot be longer than {MAX_DATA_BYTES} bytes"
        return [error("too_long", "attributes", message)]
    return []


def check_event_id(entry: dict[str, Any]) -> list[ErrorDict]:
    """An optional event ``id`` must be a ULID, the key used for deduplication."""
    if "id" not in entry:
        return []
    value = entry["id"]
    if not isinstance(value, str) or not _ULID.match(value):
        return [error("invalid", "id", "id must be a valid ULID")]
    return []


def check_identify(entry: dict[str, Any]) -> list[ErrorDict]:
    """Rules of an identify entry beyond its identifiers."""
    errors = check_timestamp(entry)
    if "attributes" in entry:
        errors += check_profile_attributes(entry["attributes"])
    return errors


def check_event(entry: dict[str, Any]) -> list[ErrorDict]:
    """Rules of an event entry beyond its identifiers."""
    return (
        check_event_name(entry)
        + check_event_data(entry)
        + check_timestamp(entry)
        + check_event_id(entry)
    )


def validate_entry(entry: Any, max_entry_bytes: int) -> list[ErrorDict]:
    """Return every error of one batch entry; empty means it can be applied."""
    errors = check_envelope(entry, max_entry_bytes)
    if errors:
        return errors
    errors = check_identifiers(entry.get("identifiers"))
    if entry["action"] == "identify":
        errors += check_identify(entry)
    elif entry["action"] == "event":
        errors += check_event(entry)
    return errors


def validate_anonymous_event(event: Any, max_bytes: int) -> list[ErrorDict]:
    """Every error of one ``POST /api/v1/events`` body (already parsed).

    The body carries the event data as ``data``; an empty ``anonymous_id`` is an
    invite event, which needs ``data.recipient``.
    """
    if not isinstance(event, dict):
        return [error("invalid", "body", "request body must be a JSON object")]
    try:
        size = json_size(event)
    except UnicodeEncodeError:
        return [error("invalid", "body", "request body must be valid UTF-8")]
    if size > max_bytes:
        return [error("too_long", "body", f"event is larger than {max_bytes} bytes")]
    errors: list[ErrorDict] = []
    anonymous_id = event.get("anonymous_id", "")
    data = event.get("data", {})
    if not isinstance(anonymous_id, str):
        errors.append(error("invalid", "anonymous_id", "anonymous_id must be a string"))
    elif not anonymous_id and not (isinstance(data, dict) and data.get("recipient")):
        message = "an event without anonymous_id needs data.recipient"
        errors.append(error("required", "data.recipient", message))
    if event.get("type", "event") not in ("event", "page", "screen"):
        errors.append(error("invalid", "type", "type must be event, page or screen"))
    renamed = {k: v for k, v in event.items() if k != "data"}
    if "data" in event:
        renamed["attributes"] = data
    for found in check_event(renamed):
        if found["field"] == "attributes":
            found = {**found, "field": "data"}
        errors.append(found)
    return errors


def _refuse_constant(constant: str) -> Any:
    """Reject NaN and Infinity so that stored state always serializes as JSON."""
    raise ValueError(constant)


def _loads(body: bytes) -> Any:
    """The body's JSON value; ValueError when it is not JSON (NaN and Infinity
    are not). orjson reads the bodies it can (an integer beyond 64 bits becomes
    a float, so such a timestamp is refused as not an integer); the standard
    library decides the rest, such as escaped lone surrogates, which are then
    refused entry by entry."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)


def parse_json(body: bytes) -> tuple[Any, str]:
    """Decode a request body into (value, ""), or (None, why it is unusable)."""
    try:
        return _loads(body), ""
    except ValueError:
        return None, "request body must be valid JSON"


def parse_batch(body: bytes) -> tuple[list[Any], str]:
    """Decode a batch body into (entries, ""), or ([], why it is unusable)."""
    try:
        payload = _loads(body)
    except ValueError:
        return [], "request body must be valid JSON"
    if not isinstance(payload, dict):
        return [], "request body must be a JSON object"
    batch = payload.get("batch")
    if not isinstance(batch, list):
        return [], "batch must be a list of entries"
    if not batch:
        return [], "batch must not be empty"
    return batch, ""


def parse_fault_specs(body: bytes) -> list[dict[str, Any]]:
    """Decode a ``{"faults": [...]}`` control body into Fault keyword dicts.

    Raises ValueError naming the problem, so a bad script fails loudly.
    """
    payload = json.loads(body.decode("utf-8") or "{}")
    items = payload.get("faults") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ValueError("faults must be a list of objects")
    specs = []
    for item in items:
        try:
            retry_after = item.get("retry_after")
            status, count = int(item["status"]), int(item.get("count", 1))
            delay_s = float(item.get("delay_s", 0.0))
            duration_s = float(item.get("duration_s", 0.0))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad fault {item!r}") from exc
        if not 100 <= status <= 599 or count < 1 or not 0 <= delay_s <= 600:
            raise ValueError("a fault needs status 100-599, count >= 1, delay 0-600 s")
        if not 0 <= duration_s <= 3600:
            raise ValueError("a fault's duration_s must be 0-3600")
        retry = None if retry_after is None else str(retry_after)
        specs.append(
            {
                "status": status,
                "count": count,
                "retry_after": retry,
                "delay_s": delay_s,
                "duration_s": duration_s,
            }
        )
    return specs
