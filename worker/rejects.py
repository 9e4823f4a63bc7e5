"""Dead-letter records: the original key, value and headers, plus why.

A rejected record is written to the dead-letter topic unchanged, with headers
prefixed ``cio.`` saying which stage refused it (decode, validate, api), the
reason code, the field at fault, a message, where it came from, how many times
it was attempted and which worker version refused it. Nothing secret is ever in
them: the message is the worker's or the API's text about the data.

A record too large for the dead-letter topic is split into chunks, not lost:
``dead_letter_records`` returns one record normally, and for an oversize one a
run of records whose values are consecutive slices of the original value, each
with the same headers plus ``cio.chunk.index``, ``cio.chunk.count``,
``cio.original.size`` and ``cio.original.sha256``. The reading side (used by the
archiver, usable by any consumer) is ``StoredDeadLetter`` and ``assemble``,
which joins chunks back into the original value and checks its digest.

When even the original key and headers leave too little room for a slice of
the value (they can be as large as the value), the chunks carry an *envelope*
instead: the JSON object ``{"key": b64|null, "headers": [[name, b64|null], ...],
"value": b64}`` holding the whole original record, marked by the header
``cio.chunk.envelope``, under a key made from the source coordinates and with
only the reason headers beside it. Joining the chunks opens the envelope, so a
reader sees the original key, headers and value either way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from worker import __version__

log = structlog.get_logger(__name__)

HEADER_PREFIX = "cio."
MAX_MESSAGE_CHARS = 1000

# librdkafka refuses to produce a record whose key, value and headers exceed its
# message.max.bytes (1,000,000 by default), and Kafka topics default to
# max.message.bytes 1,048,588. 900,000 leaves 100 KB for record and batch
# framing, so a chunk fits both defaults without any property being changed.
DEAD_LETTER_MAX_RECORD_BYTES = 900_000
# A generous bound on Kafka's framing of one record and of one header (varint
# lengths, attributes, deltas), so the size estimate never falls short.
RECORD_OVERHEAD_BYTES = 64
HEADER_OVERHEAD_BYTES = 16
# The smallest slice worth a record; chunking never cuts finer than this.
MIN_CHUNK_BYTES = 65_536

CHUNK_INDEX = "cio.chunk.index"
CHUNK_COUNT = "cio.chunk.count"
ORIGINAL_SIZE = "cio.original.size"
ORIGINAL_SHA256 = "cio.original.sha256"
# Set on the chunks of a record that had no key: they carry a key made from the
# source coordinates instead, so that every chunk lands in the same partition.
CHUNK_KEYLESS = "cio.chunk.keyless"
# Set on the chunks of an envelope: the original key, headers and value together.
CHUNK_ENVELOPE = "cio.chunk.envelope"
REASON_NAMES = (
    "stage",
    "reason",
    "field",
    "message",
    "source.topic",
    "source.partition",
    "source.offset",
    "source.timestamp",
    "attempts",
    "worker.version",
)
CHUNK_NAMES = (CHUNK_INDEX, CHUNK_COUNT, ORIGINAL_SIZE, ORIGINAL_SHA256)

Headers = list[tuple[str, str | bytes | None]]


@dataclass(frozen=True, slots=True)
class Reject:
    """Why one record was refused."""

    stage: str  # decode, validate or api
    reason: str
    message: str
    field: str | None = None
    attempts: int = 1


def reject_headers(
    message: Any, reject: Reject
) -> list[tuple[str, str | bytes | None]]:
    """The original record's headers followed by the ``cio.*`` reason headers."""
    timestamp_type, timestamp_ms = message.timestamp()
    reasons = {
        "stage": reject.stage,
        "reason": reject.reason,
        "field": reject.field or "",
        "message": reject.message[:MAX_MESSAGE_CHARS],
        "source.topic": message.topic(),
        "source.partition": str(message.partition()),
        "source.offset": str(message.offset()),
        "source.timestamp": str(timestamp_ms if timestamp_type else -1),
        "attempts": str(reject.attempts),
        "worker.version": __version__,
    }
    original: list[tuple[str, str | bytes | None]] = list(message.headers() or [])
    return original + [
        (HEADER_PREFIX + key, value.encode()) for key, value in reasons.items()
    ]


def header_map(headers: list[tuple[str, bytes]] | None) -> dict[str, str]:
    """The ``cio.*`` headers of a dead-letter record as a str dict (last wins)."""
    return {
        key[len(HEADER_PREFIX) :]: (value or b"").decode("utf-8", "replace")
        for key, value in headers or []
        if key.startswith(HEADER_PREFIX)
    }


# -- writing: one record, or chunks of an oversize one ---------------------------


class DeadLetterRecord(NamedTuple):
    """One record to produce to the dead-letter topic."""

    key: bytes | None
    value: bytes | None
    headers: Headers


def dead_letter_records(
    message: Any,
    reject: Reject,
    max_record_bytes: int = DEAD_LETTER_MAX_RECORD_BYTES,
) -> list[DeadLetterRecord]:
    """The dead-letter record(s) for one rejected message, in produce order.

    One record with the original key, value and headers plus the reason headers;
    or, when that would exceed ``max_record_bytes``, the value split into chunks
    that each fit (see the module docstring). Chunks must be produced in order
    and to the same partition, which their shared key ensures.
    """
    key, value = message.key(), message.value()
    headers = reject_headers(message, reject)
    if record_bytes(key, value, headers) <= max_record_bytes:
        return [DeadLetterRecord(key, value, headers)]

    source = f"{message.topic()}:{message.partition()}:{message.offset()}"
    widest = _chunk_headers(10**9, 10**9, 10**18, "0" * 64)
    room = max_record_bytes - record_bytes(key, b"", [*headers, *widest])
    if room < MIN_CHUNK_BYTES or not value:
        original: Headers = list(message.headers() or [])
        value = _envelope(key, original, value)
        key = f"cio.chunk:{source}".encode()
        headers = [*headers[len(original) :], (CHUNK_ENVELOPE, b"true")]
    elif key is None:
        key = f"cio.chunk:{source}".encode()
        headers = [*headers, (CHUNK_KEYLESS, b"true")]
    room = max_record_bytes - record_bytes(key, b"", [*headers, *widest])
    size = max(room, MIN_CHUNK_BYTES)
    count = -(-len(value) // size)
    digest = hashlib.sha256(value).hexdigest()
    log.info(
        "dead_letter_chunked",
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        value_bytes=len(value),
        chunks=count,
    )
    return [
        DeadLetterRecord(
            key,
            value[index * size : (index + 1) * size],
            headers + _chunk_headers(index, count, len(value), digest),
        )
        for index in range(count)
    ]


def record_bytes(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """An upper estimate of one record's size as Kafka counts it."""
    header_bytes = sum(
        HEADER_OVERHEAD_BYTES + len(name.encode()) + len(_as_bytes(v) or b"")
        for name, v in headers
    )
    return RECORD_OVERHEAD_BYTES + len(key or b"") + len(value or b"") + header_bytes


def _chunk_headers(index: int, count: int, size: int, digest: str) -> Headers:
    return [
        (CHUNK_INDEX, str(index).encode()),
        (CHUNK_COUNT, str(count).encode()),
        (ORIGINAL_SIZE, str(size).encode()),
        (ORIGINAL_SHA256, digest.encode()),
    ]


def _as_bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _envelope(key: bytes | None, headers: Headers, value: bytes | None) -> bytes:
    """The whole original record as one JSON object (see the module docstring)."""
    return json.dumps(
        {
            "key": _b64(key),
            "headers": [[name, _b64(_as_bytes(v))] for name, v in headers],
            "value": _b64(value),
        },
        separators=(",", ":"),
    ).encode()


def _open_envelope(
    data: bytes,
) -> tuple[bytes | None, tuple[tuple[str, bytes | None], ...], bytes | None] | None:
    """(key, headers, value) from an envelope, or None when it is not one."""
    try:
        envelope = json.loads(data)
        headers = tuple(
            (str(name), _unb64(value)) for name, value in envelope["headers"]
        )
        return _unb64(envelope["key"]), headers, _unb64(envelope["value"])
    except (ValueError, TypeError, KeyError, binascii.Error):
        return None


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


# -- reading: dead letters back, chunks joined -----------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """Where one chunk sits in its original value."""

    index: int
    count: int
    original_size: int
    original_sha256: str


@dataclass(frozen=True, slots=True)
class StoredDeadLetter:
    """One record read back from the dead-letter topic, as plain values."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # -1 when the record carries none
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]

    @classmethod
    def from_message(cls, message: Any) -> StoredDeadLetter:
        timestamp_type, timestamp_ms = message.timestamp()
        return cls(
            message.topic(),
            message.partition(),
            message.offset(),
            timestamp_ms if timestamp_type else -1,
            message.key(),
            message.value(),
            tuple((name, _as_bytes(v)) for name, v in message.headers() or []),
        )

    @property
    def size(self) -> int:
        return len(self.key or b"") + len(self.value or b"")

    def reasons(self) -> dict[str, str]:
        """The ``cio.*`` headers without the prefix (see ``header_map``)."""
        return header_map(list(self.headers))  # type: ignore[arg-type]

    def split_headers(self) -> tuple[Headers, Headers]:
        """(original headers, worker headers).

        The worker appends one block in a fixed layout: the reason headers in
        ``REASON_NAMES`` order, then for a chunk the keyless or envelope flag
        and the four chunk headers. Exactly that block is split off from the
        end, so the original's own headers survive even when they too start
        with ``cio.`` (a dead letter produced again, say).
        """
        names = [name for name, _ in self.headers]
        cut = len(names)
        if names[cut - len(CHUNK_NAMES) : cut] == list(CHUNK_NAMES):
            cut -= len(CHUNK_NAMES)
            if cut and names[cut - 1] in (CHUNK_KEYLESS, CHUNK_ENVELOPE):
                cut -= 1
        reasons = [HEADER_PREFIX + name for name in REASON_NAMES]
        if cut >= len(reasons) and names[cut - len(reasons) : cut] == reasons:
            cut -= len(reasons)
        else:
            cut = len(names)  # not the worker's layout: all the record's own
        return list(self.headers[:cut]), list(self.headers[cut:])

    def chunk(self) -> Chunk | None:
        """This record's place in a chunked value, or None for a whole record."""
        names = dict(self.split_headers()[1])
        if CHUNK_INDEX not in names:
            return None
        try:
            chunk = Chunk(
                int(names[CHUNK_INDEX] or b""),
                int(names[CHUNK_COUNT] or b""),
                int(names[ORIGINAL_SIZE] or b""),
                (_as_bytes(names[ORIGINAL_SHA256]) or b"").decode("ascii"),
            )
        except (KeyError, ValueError):
            return None  # malformed chunk headers: kept as an ordinary record
        return chunk if 0 <= chunk.index < chunk.count else None

    @property
    def keyless(self) -> bool:
        """True when the key is the one made for the chunks of a keyless record."""
        return any(name == CHUNK_KEYLESS for name, _ in self.split_headers()[1])

    @property
    def enveloped(self) -> bool:
        """True for a chunk of an envelope (see the module docstring)."""
        return any(name == CHUNK_ENVELOPE for name, _ in self.split_headers()[1])


@dataclass(frozen=True, slots=True)
class Rejected:
    """One rejected record rebuilt from its dead letters.

    ``parts`` holds the one dead letter of a whole record, or every chunk in
    order. ``fragment`` marks a single chunk whose siblings are not all here
    (or do not add up to the recorded digest); it is kept as it is, so nothing
    is lost, and its chunk headers let a reader join it later.
    """

    parts: tuple[StoredDeadLetter, ...]
    value: bytes | None
    fragment: bool = False
    # From an opened envelope: the original key and headers, which the parts
    # themselves do not carry.
    envelope: tuple[bytes | None, tuple[tuple[str, bytes | None], ...]] | None = None

    @property
    def first(self) -> StoredDeadLetter:
        return self.parts[0]

    @property
    def key(self) -> bytes | None:
        """The original record's key."""
        if self.envelope is not None:
            return self.envelope[0]
        first = self.first
        return None if first.keyless else first.key

    @property
    def headers(self) -> Headers:
        """The original record's own headers, without the worker's."""
        if self.envelope is not None:
            return list(self.envelope[1])
        return self.first.split_headers()[0]


ChunkId = tuple[str, str, str, str]


class Assembler:
    """Joins chunks in offset order; feed it one partition's dead letters.

    A chunk set is *open* from its index 0 until its last index arrives. A new
    index 0 for an open set (the worker restarted mid-write and wrote the set
    again), or an index out of sequence, turns what was collected into
    fragments, so a broken set never blocks the ones after it.
    """

    def __init__(self) -> None:
        self._open: dict[ChunkId, list[StoredDeadLetter]] = {}

    @property
    def is_settled(self) -> bool:
        """True when no chunk set is open."""
        return not self._open

    def add(self, record: StoredDeadLetter) -> list[Rejected]:
        """Take the next dead letter; return the records it completes."""
        chunk = record.chunk()
        if chunk is None:
            return [Rejected((record,), record.value)]
        reasons = record.reasons()
        ident = (
            reasons.get("source.topic", ""),
            reasons.get("source.partition", ""),
            reasons.get("source.offset", ""),
            chunk.original_sha256,
        )
        parts = self._open.pop(ident, [])
        done: list[Rejected] = []
        if chunk.index != len(parts):
            done += _fragments(parts)
            parts = []
            if chunk.index != 0:
                return [*done, *_fragments([record])]
        parts.append(record)
        if len(parts) < chunk.count:
            self._open[ident] = parts
            return done
        return done + _joined(parts, chunk)

    def close(self) -> list[Rejected]:
        """Give up on every open set: its chunks come back as fragments."""
        done = [r for parts in self._open.values() for r in _fragments(parts)]
        self._open.clear()
        return sorted(done, key=lambda r: r.first.offset)


def assemble(records: Sequence[StoredDeadLetter]) -> list[Rejected]:
    """Every rejected record in ``records`` (one partition, offset order), with
    chunks joined; chunks of sets not complete within ``records`` come back as
    fragments. Ordered by the offset of each record's first dead letter."""
    assembler = Assembler()
    done: list[Rejected] = []
    for record in records:
        done += assembler.add(record)
    done += assembler.close()
    return sorted(done, key=lambda r: r.first.offset)


def settled_through(records: Sequence[StoredDeadLetter]) -> int | None:
    """The last offset in ``records`` after which no chunk set is open, or None.

    Archiving ``records`` up to that offset never splits a chunk set.
    """
    assembler = Assembler()
    last = None
    for record in records:
        assembler.add(record)
        if assembler.is_settled:
            last = record.offset
    return last


def _joined(parts: list[StoredDeadLetter], chunk: Chunk) -> list[Rejected]:
    value = b"".join(p.value or b"" for p in parts)
    digest = hashlib.sha256(value).hexdigest()
    if len(value) != chunk.original_size or digest != chunk.original_sha256:
        return _fragments(parts)
    if parts[0].enveloped:
        opened = _open_envelope(value)
        if opened is None:
            return _fragments(parts)
        key, headers, original = opened
        return [Rejected(tuple(parts), original, envelope=(key, headers))]
    return [Rejected(tuple(parts), value)]


def _fragments(parts: list[StoredDeadLetter]) -> list[Rejected]:
    return [Rejected((p,), p.value, fragment=True) for p in parts]
