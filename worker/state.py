"""Dedupe state: what was last delivered, as digests per key. Pure, no I/O.

The state of one input partition lives in the same-numbered partition of a
compacted state topic (see ``statestore``). Each record there is one key:

- ``p\\x00<identifier type>:<identifier>``: a person, with the digest of the
  attributes last delivered (mode ``unchanged``) or one digest per attribute
  (mode ``changed_attributes``);
- ``e\\x00<EVENT ID>``: an event id delivered at a Unix time; expired after the
  configured retention by a tombstone.

Only digests are kept, never payloads: in memory a person costs a 64-bit slot
and a 64-bit digest.
Decisions are made when a record is batched and applied to the in-memory state
at once, so a second identical record in the same batch is skipped too; if the
API then refuses the entry, ``revert`` restores the previous value.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from hashlib import blake2b
from typing import Any

import orjson

PERSON_PREFIX = b"p\x00"
EVENT_PREFIX = b"e\x00"
DIGEST_BYTES = 8
# Value tags: which mode wrote a person value.
WHOLE_DIGEST_TAG = b"1"
ATTRIBUTE_DIGESTS_TAG = b"2"


class PersonDedupe(StrEnum):
    OFF = "off"
    UNCHANGED = "unchanged"
    CHANGED_ATTRIBUTES = "changed_attributes"


class EventDedupe(StrEnum):
    OFF = "off"
    ID = "id"


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """One record to write to the state topic; ``value`` None is a tombstone."""

    key: bytes
    value: bytes | None
    previous: bytes | None = None


@dataclass(frozen=True, slots=True)
class PersonDecision:
    """Send these attributes (or skip), and the state update that goes with it."""

    skip: bool
    attributes: dict[str, Any]
    update: StateUpdate | None


def person_key(identifiers: dict[str, Any]) -> bytes:
    """The state key of a person: identifier type and value (emails lower-cased)."""
    (kind, value), *_ = identifiers.items()
    text = str(value).lower() if kind == "email" else str(value)
    return PERSON_PREFIX + f"{kind}:{text}".encode()


def event_key(event_id: str) -> bytes:
    return EVENT_PREFIX + event_id.upper().encode()


# The canonical JSON the digests are taken of: the text json.dumps writes with
# these options, from one encoder built once instead of one per call. Digests
# already on the state topic depend on it, so it must not change.
_canonical_json = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), default=str
).encode


# Types whose orjson text equals the canonical JSON's, once the whole text is
# ASCII without DEL (the canonical JSON escapes every other character, and DEL).
_ORJSON_SAFE = frozenset({str, int, bool, type(None)})
# Floats the two write alike: zero, and magnitudes from 1e-4 up to 1e16, which
# both write as plain decimals, the shortest that reads back exactly (1e16 is
# "1e+16" to one and "1e16" to the other). NaN and infinities fail the test.
_FLOAT_LOW, _FLOAT_HIGH = 1e-4, 1e16


def _orjson_safe(value: Any) -> bool:
    kind = type(value)
    if kind in _ORJSON_SAFE:
        return True
    return kind is float and (value == 0 or _FLOAT_LOW <= abs(value) < _FLOAT_HIGH)


def _canonical(value: Any) -> bytes:
    """The canonical JSON of ``value``: written by orjson when that is certain
    to give the same bytes (a flat map of text, integers, booleans, nulls and
    most floats, the usual attributes), else by the standard library."""
    if _orjson_safe(value) or (
        type(value) is dict and all(_orjson_safe(v) for v in value.values())
    ):
        try:
            data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # keys that are not text, integers beyond 64 bits
            pass
        else:
            if data.isascii() and data.find(b"\x7f") < 0:
                return data
    return _canonical_json(value).encode()


def digest(value: Any) -> bytes:
    """An 8-byte digest of a JSON value, independent of key order."""
    return blake2b(_canonical(value), digest_size=DIGEST_BYTES).digest()


def _slot(key: bytes) -> int:
    """A person's in-memory slot: a 64-bit hash of the state key.

    Holding an int instead of the key bytes halves the memory per person. Two
    people sharing a slot (about one chance in 10^7 per million people) can only
    cost a re-send, never a skip, unless their attribute digests match too.
    """
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "big")


class PartitionState:
    """The digests of one state partition, and the order events expire in.

    People are held as ``{slot: digest}`` (see ``_slot``); values are kept as
    written to the topic so a revert restores them exactly. Events are held as
    ``{key: delivered at}``; the order they expire in is kept as runs of keys
    delivered in the same second, which share one int for that second, so an
    event id costs its key and two references instead of a tuple and an int.
    """

    def __init__(self) -> None:
        self.people: dict[int, bytes | int] = {}
        self.events: dict[bytes, int] = {}
        self._event_order: deque[tuple[int, list[bytes]]] = deque()

    def __len__(self) -> int:
        return len(self.people) + len(self.events)

    def load(self, key: bytes, value: bytes | None) -> None:
        """Apply one state-topic record while restoring (later records win)."""
        if key.startswith(PERSON_PREFIX):
            if value is None:
                self.people.pop(_slot(key), None)
            else:
                self.people[_slot(key)] = _compact(value)
        elif key.startswith(EVENT_PREFIX):
            if value is None:
                self.events.pop(key, None)
            else:
                self._remember_event(key, int(value))

    def decide_person(
        self,
        identifiers: dict[str, Any],
        attributes: dict[str, Any],
        mode: PersonDedupe,
    ) -> PersonDecision:
        """Whether an identify must be sent, and with which attributes."""
        if mode is PersonDedupe.OFF:
            return PersonDecision(False, attributes, None)
        key = person_key(identifiers)
        slot = _slot(key)
        previous = _expand(self.people.get(slot))
        if mode is PersonDedupe.UNCHANGED:
            value = WHOLE_DIGEST_TAG + digest(attributes)
            if value == previous:
                return PersonDecision(True, attributes, None)
            self.people[slot] = _compact(value)
            return PersonDecision(False, attributes, StateUpdate(key, value, previous))
        return self._decide_changed(key, previous, attributes)

    def _decide_changed(
        self, key: bytes, previous: bytes | None, attributes: dict[str, Any]
    ) -> PersonDecision:
        known = _attribute_digests(previous)
        current = {name: digest(value).hex() for name, value in attributes.items()}
        changed = {
            name: attributes[name]
            for name, value in current.items()
            if known.get(name) != value
        }
        if not changed:
            return PersonDecision(True, {}, None)
        merged = {**known, **current}
        value = (
            ATTRIBUTE_DIGESTS_TAG
            + json.dumps(merged, sort_keys=True, separators=(",", ":")).encode()
        )
        self.people[_slot(key)] = value
        return PersonDecision(False, changed, StateUpdate(key, value, previous))

    def forget_person(self, identifiers: dict[str, Any]) -> StateUpdate:
        """A person deleted or suppressed: forget them, so a later identify with
        the same attributes is sent again. Returns the tombstone to write."""
        key = person_key(identifiers)
        previous = _expand(self.people.pop(_slot(key), None))
        return StateUpdate(key, None, previous)

    def decide_event(
        self, event_id: str, mode: EventDedupe, now_s: int
    ) -> tuple[bool, StateUpdate | None]:
        """(skip, update): skip an event whose id was already delivered."""
        if mode is EventDedupe.OFF:
            return False, None
        key = event_key(event_id)
        if key in self.events:
            return True, None
        self._remember_event(key, now_s)
        return False, StateUpdate(key, str(now_s).encode(), None)

    def revert(self, update: StateUpdate) -> None:
        """Undo a decision whose entry the API refused."""
        if update.key.startswith(PERSON_PREFIX):
            if update.previous is None:
                self.people.pop(_slot(update.key), None)
            else:
                self.people[_slot(update.key)] = _compact(update.previous)
        else:
            self.events.pop(update.key, None)

    def expire_events(self, now_s: int, retention_s: int) -> list[StateUpdate]:
        """Forget event ids older than the retention; return their tombstones."""
        horizon = now_s - retention_s
        tombstones = []
        order, events = self._event_order, self.events
        while order and order[0][0] < horizon:
            delivered_at, keys = order.popleft()
            for key in keys:
                if events.get(key) == delivered_at:
                    del events[key]
                    tombstones.append(StateUpdate(key, None))
        return tombstones

    def _remember_event(self, key: bytes, delivered_at: int) -> None:
        order = self._event_order
        if order and order[-1][0] == delivered_at:
            delivered_at, keys = order[-1]  # the run's own int, shared
            keys.append(key)
        else:
            order.append((delivered_at, [key]))
        self.events[key] = delivered_at


def _compact(value: bytes) -> bytes | int:
    """A whole-record digest value held as an int (smaller than bytes)."""
    if len(value) == 1 + DIGEST_BYTES and value.startswith(WHOLE_DIGEST_TAG):
        return int.from_bytes(value[1:], "big")
    return value


def _expand(held: bytes | int | None) -> bytes | None:
    """The value as written to the topic, from what ``_compact`` kept."""
    if isinstance(held, int):
        return WHOLE_DIGEST_TAG + held.to_bytes(DIGEST_BYTES, "big")
    return held


def _attribute_digests(value: bytes | None) -> dict[str, str]:
    if not value or not value.startswith(ATTRIBUTE_DIGESTS_TAG):
        return {}
    loaded: dict[str, str] = json.loads(value[len(ATTRIBUTE_DIGESTS_TAG) :])
    return loaded
