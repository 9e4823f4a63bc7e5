"""The state's stored format and expiry order stay as they were.

Digests are written to the compacted state topic and read back by later
versions, so ``digest`` must keep giving the same bytes; event ids must expire
in the order, and with the tombstones, of the one-entry-per-id bookkeeping the
state used before it kept runs of ids per second.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections import deque
from typing import Any

from worker.state import (
    EventDedupe,
    PartitionState,
    StateUpdate,
    digest,
    event_key,
)


def _digest_as_written(value: Any) -> bytes:
    """The digest as the first versions wrote it to the state topic."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).digest()


def test_digest_of_a_known_value_is_unchanged() -> None:
    """A digest computed by the first version, written down."""
    value = {"plan": "free", "n": 1, "name": "Ørsted", "ltv": 12.5, "ok": True,
             "tags": ["a", None]}  # fmt: skip

    assert digest(value).hex() == "8c2cbf8c3822e15c"


def test_digest_equals_the_stored_format_for_many_values() -> None:
    rng = random.Random(9)
    scalars: list[Any] = [None, True, False, 0, -7, 2**70, 1.5, -0.0, 1e300]
    scalars += ["", "ascii", "Ørsted 日本 🎉", 'quote"back\\slash\n']
    for _ in range(2_000):
        value = {
            f"k{rng.randint(0, 40)}{rng.choice(['', 'é', 'Z'])}": rng.choice(
                [*scalars, [rng.choice(scalars)], {"x": rng.choice(scalars)}]
            )
            for _ in range(rng.randint(0, 25))
        }
        assert digest(value) == _digest_as_written(value)


class _OneEntryPerId:
    """The event bookkeeping before runs: one (time, key) entry per id."""

    def __init__(self) -> None:
        self.events: dict[bytes, int] = {}
        self.order: deque[tuple[int, bytes]] = deque()

    def remember(self, key: bytes, at: int) -> None:
        self.events[key] = at
        self.order.append((at, key))

    def expire(self, now_s: int, retention_s: int) -> list[StateUpdate]:
        horizon = now_s - retention_s
        tombstones = []
        while self.order and self.order[0][0] < horizon:
            at, key = self.order.popleft()
            if self.events.get(key) == at:
                del self.events[key]
                tombstones.append(StateUpdate(key, None))
        return tombstones


def test_event_expiry_matches_one_entry_per_id() -> None:
    """Random deliveries, restores (out of order too), reverts and expiries:
    the same decisions, the same tombstones in the same order."""
    rng = random.Random(4)
    state, reference = PartitionState(), _OneEntryPerId()
    ids = [f"01HZY6M3Z5QK0V8W2X9Y7T{n:04d}" for n in range(300)]
    now = 1_000
    for _ in range(20_000):
        action = rng.random()
        if action < 0.55:
            event_id = rng.choice(ids)
            skip, update = state.decide_event(event_id, EventDedupe.ID, now)
            key = event_key(event_id)
            assert skip == (key in reference.events)
            if not skip:
                reference.remember(key, now)
                assert update == StateUpdate(key, str(now).encode(), None)
        elif action < 0.75:
            key = event_key(rng.choice(ids))
            at = now - rng.randint(-5, 50)
            state.load(key, str(at).encode())
            reference.remember(key, at)
        elif action < 0.8:
            key = event_key(rng.choice(ids))
            state.load(key, None)
            reference.events.pop(key, None)
        elif action < 0.85:
            key = event_key(rng.choice(ids))
            state.revert(StateUpdate(key, b"1", None))
            reference.events.pop(key, None)
        elif action < 0.95:
            now += rng.randint(0, 3)
        else:
            retention = rng.randint(0, 40)
            assert state.expire_events(now, retention) == reference.expire(
                now, retention
            )
        assert state.events == reference.events
    assert len(state) == len(reference.events)


def test_ids_delivered_in_one_second_share_one_time_object() -> None:
    """Memory: one int per second of deliveries, not one per id."""
    state = PartitionState()
    for n in range(100):
        now_s = int("1700")  # a new int object each time, as the clock gives
        state.decide_event(f"01HZY6M3Z5QK0V8W2X9Y7T{n:04d}", EventDedupe.ID, now_s)

    assert len({id(at) for at in state.events.values()}) == 1


def test_digest_of_flat_attributes_equals_the_stored_format() -> None:
    """The usual attributes (text, integers, booleans, nulls in one map) take a
    faster writer: its bytes must be the stored format's for every character
    class the canonical JSON escapes (control characters, DEL, non-ASCII,
    quotes), 64-bit bounds and beyond, and keys that are not text."""
    rng = random.Random(21)
    alphabet = 'abZ09 ~"\\/\n\t\r\x00\x08\x0c\x1b\x1f\x7f\x80éØ日🎉'
    scalars: list[Any] = [None, True, False, 0, 2**63 - 1, -(2**63), 2**64, -(2**70)]
    for _ in range(5_000):
        value: dict[Any, Any] = {
            f"k{rng.randint(0, 99)}{rng.choice(['', '_', 'Z', '~', ' ', 'é'])}": (
                rng.choice(scalars)
                if rng.random() < 0.4
                else "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            )
            for _ in range(rng.randint(0, 25))
        }
        assert digest(value) == _digest_as_written(value)
        assert digest(next(iter(value.values()), "")) == _digest_as_written(
            next(iter(value.values()), "")
        )
    assert digest({1: "a", 2: "b"}) == _digest_as_written({1: "a", 2: "b"})


def test_digest_of_attributes_with_floats_equals_the_stored_format() -> None:
    """Floats take the faster writer only where it spells them as the stored
    format does: random magnitudes from 1e-330 to 1e308 (both writers' plain
    and exponent forms), random bit patterns, and the edges of the range."""
    rng = random.Random(33)
    edges = [0.0, -0.0, 1e-4, math.nextafter(1e-4, 0), 1e16, math.nextafter(1e16, 0),
             -1e16, 9999999999999998.0, 5e-324, 1.7976931348623157e308,
             math.inf, -math.inf, math.nan, 0.1, 100.0]  # fmt: skip
    for _ in range(20_000):
        magnitude = rng.choice([-1, 1]) * 10 ** rng.uniform(-330, 308)
        bits = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        value = {
            "f": magnitude,
            "r": round(magnitude, rng.randint(0, 8)),
            "b": bits,
            "e": rng.choice(edges),
            "s": "text",
            "n": 7,
        }
        assert digest(value) == _digest_as_written(value)
        for scalar in value.values():
            assert digest(scalar) == _digest_as_written(scalar)
