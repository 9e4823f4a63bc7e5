"""Unit tests of worker.batcher: sealing, one batch in flight, body bytes."""

from __future__ import annotations

import json

import pytest

from tests.unit.fakes import FakeMessage
from worker.batcher import BODY_OVERHEAD_BYTES, BatchLimits, Item, PartitionBuffer
from worker.rejects import Reject

TOPIC = "persons"
BIG = 10_000_000


def entry_of(size: int, tag: int = 0) -> bytes:
    """A JSON object entry of exactly `size` bytes carrying `tag`."""
    head = b'{"n":' + str(tag).encode() + b',"p":"'
    return head + b"a" * (size - len(head) - 2) + b'"}'


def entry_item(offset: int, size: int = 20, value: bytes = b"v") -> Item:
    return Item(
        offset, FakeMessage(value, offset_number=offset), entry=entry_of(size, offset)
    )


def reject_item(offset: int, value: bytes = b"bad") -> Item:
    reject = Reject("decode", "bad_avro", "not avro")
    return Item(offset, FakeMessage(value, offset_number=offset), reject=reject)


def buffer(
    max_entries: int = 1000, max_request_bytes: int = BIG, linger_s: float = 0.5
) -> PartitionBuffer:
    return PartitionBuffer(
        TOPIC, 3, BatchLimits(max_entries, max_request_bytes, linger_s)
    )


def drain(buf: PartitionBuffer) -> list[list[int]]:
    """Offsets of every sealed batch, taking and completing them one by one."""
    batches = []
    while (batch := buf.take_next()) is not None:
        batches.append([item.offset for item in batch.items])
        buf.complete(batch)
    return batches


def test_body_overhead_matches_wrapper_bytes() -> None:
    """The body overhead constant is the byte length of the JSON wrapper."""
    wrapper = b'{"batch":[]}'

    overhead = BODY_OVERHEAD_BYTES

    assert overhead == len(wrapper) == 12


@pytest.mark.parametrize(
    ("max_entries", "count", "sealed"),
    [
        (3, 2, []),
        (3, 3, [[0, 1, 2]]),
        (3, 7, [[0, 1, 2], [3, 4, 5]]),
        (1, 2, [[0], [1]]),
    ],
)
def test_add_reaching_max_entries_seals_batch(
    max_entries: int, count: int, sealed: list[list[int]]
) -> None:
    """A batch is sealed as soon as it holds max_entries entries, not before."""
    buf = buffer(max_entries=max_entries)

    for offset in range(count):
        buf.add(entry_item(offset), now=0.0)

    assert drain(buf) == sealed


@pytest.mark.parametrize(
    ("second_size", "sealed_before_second"),
    [
        (45, False),  # body 12 + 40 + 1 + 45 = 98 bytes
        (46, False),  # body 99 bytes: the largest body under 100
        (47, True),  # body would be exactly 100: not strictly under
        (48, True),  # body would be 101
    ],
)
def test_add_entry_reaching_max_request_bytes_seals_first(
    second_size: int, sealed_before_second: bool
) -> None:
    """An entry that would take the body to max_request_bytes starts a new batch."""
    buf = buffer(max_request_bytes=100)
    buf.add(Item(0, FakeMessage(b"v"), entry=entry_of(40, 0)), now=0.0)

    buf.add(Item(1, FakeMessage(b"v"), entry=entry_of(second_size, 1)), now=0.0)
    buf.seal_if_due(0.0, force=True)
    batches = []
    while (batch := buf.take_next()) is not None:
        batches.append(batch)
        buf.complete(batch)

    expected = [[0], [1]] if sealed_before_second else [[0, 1]]
    assert [[i.offset for i in b.items] for b in batches] == expected
    for batch in batches:
        assert len(batch.body()) == batch.body_bytes
        assert len(batch.body()) < 100


def test_add_many_entries_every_body_strictly_under_max_request_bytes() -> None:
    """Bodies of a long run of entries stay under the limit and fill it closely."""
    max_bytes = 40_000
    buf = buffer(max_request_bytes=max_bytes)

    for offset in range(50):
        buf.add(entry_item(offset, size=3_000), now=0.0)
    buf.seal_if_due(0.0, force=True)
    bodies = []
    while (batch := buf.take_next()) is not None:
        bodies.append(batch.body())
        buf.complete(batch)

    # 12 + 13 * 3000 + 12 commas = 39,024 bytes; a 14th entry makes 42,025.
    assert [len(json.loads(b)["batch"]) for b in bodies] == [13, 13, 13, 11]
    assert all(len(body) < max_bytes for body in bodies)
    assert len(bodies[0]) == 12 + 13 * 3_000 + 12


@pytest.mark.parametrize(
    ("elapsed", "sealed"),
    [(0.0, False), (0.25, False), (0.5, True), (1.0, True)],
)
def test_seal_if_due_after_linger_seals_open_batch(
    elapsed: float, sealed: bool
) -> None:
    """The open batch is sealed once it has waited linger_s, not earlier."""
    buf = buffer(linger_s=0.5)
    buf.add(entry_item(0), now=100.0)

    buf.seal_if_due(100.0 + elapsed)

    assert (buf.take_next() is not None) is sealed


def test_next_deadline_open_batch_is_creation_plus_linger() -> None:
    """The next deadline is the open batch's creation time plus the linger."""
    buf = buffer(linger_s=0.5)
    before = buf.next_deadline()

    buf.add(entry_item(0), now=100.0)
    buf.add(entry_item(1), now=100.25)

    assert before is None
    assert buf.next_deadline() == 100.5


def test_seal_if_due_forced_seals_immediately() -> None:
    """A forced seal sends a batch that has not lingered at all."""
    buf = buffer(linger_s=60.0)
    buf.add(entry_item(0), now=100.0)

    buf.seal_if_due(100.0, force=True)
    batch = buf.take_next()

    assert batch is not None
    assert batch.first_offset == batch.last_offset == 0


def test_seal_if_due_nothing_open_seals_nothing() -> None:
    """Sealing an empty buffer produces no batch."""
    buf = buffer()

    buf.seal_if_due(1_000.0, force=True)

    assert buf.take_next() is None
    assert buf.is_idle()


def test_take_next_batch_in_flight_returns_none() -> None:
    """A second batch of the same partition waits until the first completes."""
    buf = buffer(max_entries=1)
    buf.add(entry_item(0), now=0.0)
    buf.add(entry_item(1), now=0.0)
    first = buf.take_next()

    blocked = buf.take_next()
    assert first is not None
    buf.complete(first)
    second = buf.take_next()

    assert blocked is None
    assert first.first_offset == 0
    assert second is not None
    assert second.first_offset == 1
    assert buf.in_flight is second


def test_complete_releases_buffered_bytes() -> None:
    """Completing a batch subtracts exactly its entry and value bytes."""
    buf = buffer(max_entries=2)
    buf.add(entry_item(0, size=20, value=b"abc"), now=0.0)
    buf.add(entry_item(1, size=30, value=b"defgh"), now=0.0)
    buf.add(entry_item(2, size=40, value=b"ij"), now=0.0)
    batch = buf.take_next()
    assert batch is not None
    before = buf.buffered_bytes

    buf.complete(batch)

    assert before == (20 + 3) + (30 + 5) + (40 + 2)
    assert batch.buffered_bytes == (20 + 3) + (30 + 5)
    assert buf.buffered_bytes == 40 + 2


def test_item_size_tombstone_counts_entry_only() -> None:
    """An item whose message has no value counts only its entry bytes."""
    item = Item(0, FakeMessage(None), entry=entry_of(25))

    size = item.size

    assert size == 25


def test_add_rejected_items_ride_along_without_counting() -> None:
    """Rejected items stay in offset order in the batch and are not entries."""
    buf = buffer(max_entries=2)

    buf.add(entry_item(0), now=0.0)
    buf.add(reject_item(1), now=0.0)
    buf.add(reject_item(2), now=0.0)
    buf.add(entry_item(3), now=0.0)
    batch = buf.take_next()

    assert batch is not None
    assert [item.offset for item in batch.items] == [0, 1, 2, 3]
    assert batch.entry_count == 2
    assert [item.offset for item in batch.entry_items()] == [0, 3]
    assert json.loads(batch.body())["batch"] == [
        json.loads(entry_of(20, 0)),
        json.loads(entry_of(20, 3)),
    ]


def test_add_only_rejects_body_is_empty_batch() -> None:
    """A batch of rejected items alone has an empty entry list."""
    buf = buffer()
    buf.add(reject_item(7), now=0.0)

    buf.seal_if_due(0.0, force=True)
    batch = buf.take_next()

    assert batch is not None
    assert batch.entries() == []
    assert batch.body() == b'{"batch":[]}'
    assert (batch.first_offset, batch.last_offset) == (7, 7)


def test_body_is_valid_json_in_offset_order() -> None:
    """The body parses as JSON with the entries in the order they were added."""
    buf = buffer()
    for offset in range(10, 16):
        buf.add(entry_item(offset, size=30), now=0.0)

    buf.seal_if_due(0.0, force=True)
    batch = buf.take_next()

    assert batch is not None
    assert [e["n"] for e in json.loads(batch.body())["batch"]] == list(range(10, 16))
    assert len(batch.body()) == batch.body_bytes == 12 + 6 * 30 + 5


def test_is_idle_through_a_batch_lifecycle_tracks_state() -> None:
    """The buffer is idle only when nothing is open, sealed or in flight."""
    buf = buffer()
    states = [buf.is_idle()]

    buf.add(entry_item(0), now=0.0)
    states.append(buf.is_idle())
    buf.seal_if_due(0.0, force=True)
    states.append(buf.is_idle())
    batch = buf.take_next()
    assert batch is not None
    states.append(buf.is_idle())
    buf.complete(batch)
    states.append(buf.is_idle())

    assert states == [True, False, False, False, True]


def _seal_by_linger(buf: PartitionBuffer, items: list[Item], at: float) -> None:
    for item in items:
        buf.add(item, now=at)
    buf.seal_if_due(at + 1.0)


def test_take_next_joins_batches_sealed_while_waiting() -> None:
    """Batches sealed by linger while one was in flight go out as one request,
    rejects and all, in offset order, with the body's exact byte count."""
    buf = buffer(max_entries=10)
    _seal_by_linger(buf, [entry_item(0)], at=0.0)
    first = buf.take_next()
    assert first is not None
    _seal_by_linger(buf, [entry_item(1), reject_item(2)], at=1.0)
    _seal_by_linger(buf, [reject_item(3)], at=2.0)
    _seal_by_linger(buf, [entry_item(4), entry_item(5)], at=3.0)
    buf.complete(first)

    joined = buf.take_next()

    assert joined is not None
    assert [item.offset for item in joined.items] == [1, 2, 3, 4, 5]
    assert joined.entry_count == 3
    assert joined.body_bytes == len(joined.body())
    assert [e["n"] for e in json.loads(joined.body())["batch"]] == [1, 4, 5]
    assert joined.buffered_bytes == sum(item.size for item in joined.items)
    buf.complete(joined)
    assert buf.buffered_bytes == 0
    assert buf.is_idle()


@pytest.mark.parametrize(
    ("max_entries", "max_request_bytes", "expected"),
    [
        (5, BIG, [[0, 1, 2], [3, 4, 5, 6]]),  # 3 + 3 entries > 5; 3 + 1 fit
        (6, BIG, [[0, 1, 2, 3, 4, 5], [6]]),  # 3 + 3 fit; + 1 does not
        # Entries of 20 bytes: bodies of 3, 4, 6 and 7 take 74, 95, 137, 158 bytes
        (1000, 138, [[0, 1, 2, 3, 4, 5], [6]]),
        (1000, 137, [[0, 1, 2], [3, 4, 5, 6]]),
    ],
)
def test_take_next_joins_only_what_one_request_holds(
    max_entries: int, max_request_bytes: int, expected: list[list[int]]
) -> None:
    """Joining stops where the next batch would break the entry count or byte
    limit; every joined body stays strictly under the byte limit."""
    buf = buffer(max_entries=max_entries, max_request_bytes=max_request_bytes)
    _seal_by_linger(buf, [entry_item(n) for n in (0, 1, 2)], at=0.0)
    _seal_by_linger(buf, [entry_item(n) for n in (3, 4, 5)], at=1.0)
    _seal_by_linger(buf, [entry_item(6)], at=2.0)

    taken = []
    while (batch := buf.take_next()) is not None:
        assert len(batch.body()) == batch.body_bytes < max_request_bytes
        taken.append([item.offset for item in batch.items])
        buf.complete(batch)

    assert taken == expected
