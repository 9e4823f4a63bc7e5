"""Per-partition batches, sealed by entry count, request bytes or linger time.

Pure bookkeeping, no I/O: the consumer loop adds items in offset order and asks
for batches to send. A batch covers a contiguous run of offsets and holds both
entries to send and records already rejected (undecodable or invalid), so that
when the batch completes, every offset up to its last is settled and may be
committed. At most one batch per partition is in flight, which keeps order.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from worker.rejects import Reject
from worker.state import StateUpdate

# Bytes of '{"batch":[' and ']}' around the comma-joined entries.
BODY_OVERHEAD_BYTES = len(b'{"batch":[') + len(b"]}")


@dataclass(slots=True)
class Item:
    """One consumed record: its serialized entry, why it was rejected, or that it
    needs no request (skipped); plus the state update its delivery implies."""

    offset: int
    message: Any  # confluent_kafka.Message: original key, value and headers
    entry: bytes | None = None
    reject: Reject | None = None
    skipped: bool = False  # nothing to send: a duplicate, or ignored by policy
    state_update: StateUpdate | None = None
    state_partition: int = -1
    # The entry as a dict, from mapping to dedupe only: dedupe reads it instead
    # of parsing ``entry`` again, then drops it (it is not kept while buffered).
    data: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        value = self.message.value()
        return len(self.entry or b"") + (len(value) if value else 0)


@dataclass(slots=True)
class Batch:
    """A contiguous run of one partition's items, sent as one request."""

    topic: str
    partition: int
    created_at: float
    items: list[Item] = field(default_factory=list)
    entry_count: int = 0
    body_bytes: int = BODY_OVERHEAD_BYTES
    buffered_bytes: int = 0

    @property
    def first_offset(self) -> int:
        return self.items[0].offset

    @property
    def last_offset(self) -> int:
        return self.items[-1].offset

    def body(self) -> bytes:
        """The request body: every entry in offset order."""
        return b'{"batch":[' + b",".join(self.entries()) + b"]}"

    def entries(self) -> list[bytes]:
        return [item.entry for item in self.items if item.entry is not None]

    def entry_items(self) -> list[Item]:
        """The items that carry an entry, in the order they appear in the body."""
        return [item for item in self.items if item.entry is not None]

    def fits(self, entry: bytes | None, max_entries: int, max_bytes: int) -> bool:
        if entry is None or self.entry_count == 0:
            return True
        added = len(entry) + 1  # the comma before it
        return self.entry_count < max_entries and self.body_bytes + added < max_bytes

    def can_absorb(self, other: Batch, max_entries: int, max_bytes: int) -> bool:
        """Whether ``other``'s items, appended, still make one request."""
        if self.entry_count == 0 or other.entry_count == 0:
            return True
        return self.entry_count + other.entry_count <= max_entries and (
            self._joined_body_bytes(other) < max_bytes
        )

    def absorb(self, other: Batch) -> None:
        """Append ``other``'s items (the run of offsets right after this one's)."""
        self.body_bytes = self._joined_body_bytes(other)
        self.items.extend(other.items)
        self.entry_count += other.entry_count
        self.buffered_bytes += other.buffered_bytes

    def _joined_body_bytes(self, other: Batch) -> int:
        """The body bytes of this batch's entries followed by ``other``'s: one
        wrapper, and a comma between the two runs when both have entries."""
        if not other.entry_count:
            return self.body_bytes
        if not self.entry_count:
            return other.body_bytes
        return self.body_bytes + other.body_bytes - BODY_OVERHEAD_BYTES + 1

    def add(self, item: Item, size: int | None = None) -> None:
        """Append an item; ``size`` is its ``item.size`` when the caller has it."""
        self.items.append(item)
        self.buffered_bytes += item.size if size is None else size
        if item.entry is not None:
            self.body_bytes += len(item.entry) + (1 if self.entry_count else 0)
            self.entry_count += 1


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_entries: int
    max_request_bytes: int
    linger_s: float


class PartitionBuffer:
    """The open batch, the sealed ones waiting, and the one in flight."""

    def __init__(self, topic: str, partition: int, limits: BatchLimits) -> None:
        self.topic = topic
        self.partition = partition
        self._limits = limits
        self._open: Batch | None = None
        self._sealed: deque[Batch] = deque()
        self.in_flight: Batch | None = None
        self.buffered_bytes = 0

    def add(self, item: Item, now: float) -> None:
        """Append an item, sealing the open batch first if it would overflow."""
        limits = self._limits
        if self._open is not None and not self._open.fits(
            item.entry, limits.max_entries, limits.max_request_bytes
        ):
            self._seal()
        if self._open is None:
            self._open = Batch(self.topic, self.partition, created_at=now)
        size = item.size
        self._open.add(item, size)
        self.buffered_bytes += size
        if self._open.entry_count >= limits.max_entries:
            self._seal()

    def seal_if_due(self, now: float, force: bool = False) -> None:
        """Seal the open batch once it has lingered long enough (or if forced)."""
        if self._open is None:
            return
        if force or now - self._open.created_at >= self._limits.linger_s:
            self._seal()

    def take_next(self) -> Batch | None:
        """Move the oldest sealed batch in flight, unless one already is, joined
        with the sealed batches after it as far as one request holds them.

        Batches sealed by linger while the partition waited (on the rate limit,
        on retries, on the batch before them) go out together: under a limit
        the requests grow instead of queueing up, so a short linger costs
        requests only while there are requests to spare."""
        if self.in_flight is not None or not self._sealed:
            return None
        batch = self._sealed.popleft()
        limits = self._limits
        while self._sealed and batch.can_absorb(
            self._sealed[0], limits.max_entries, limits.max_request_bytes
        ):
            batch.absorb(self._sealed.popleft())
        self.in_flight = batch
        return batch

    def complete(self, batch: Batch) -> None:
        """Forget the in-flight batch once its outcome is settled."""
        assert batch is self.in_flight
        self.in_flight = None
        self.buffered_bytes -= batch.buffered_bytes

    def unsettled_items(self) -> list[Item]:
        """Every item not yet settled, oldest first: in flight, waiting, open."""
        batches = [self.in_flight, *self._sealed, self._open]
        return [item for batch in batches if batch is not None for item in batch.items]

    def is_idle(self) -> bool:
        """True when nothing is open, waiting or in flight."""
        return self._open is None and not self._sealed and self.in_flight is None

    def next_deadline(self) -> float | None:
        """When the open batch's linger ends, if there is one."""
        if self._open is None:
            return None
        return self._open.created_at + self._limits.linger_s

    def _seal(self) -> None:
        if self._open is not None and self._open.items:
            self._sealed.append(self._open)
        self._open = None
