"""What the archive writes and when: object names, the line format, range cuts.

Pure, no I/O; the archiver (``worker.archive``) calls these with its buffers
and its clock. Each flush of a dead-letter partition covers a contiguous range
of its offsets, ``first..last``, and writes one object per source topic and
day found in it::

    {prefix}/{source_topic}/dt={YYYY-MM-DD}/
        part-{partition:04d}-{first:020d}-{last:020d}.jsonl.gz

(one key, cut here to fit the page).

The day is the UTC date of the dead letter's Kafka timestamp (``unknown`` when
it has none); characters outside ``[A-Za-z0-9._-]`` in a source topic become
``_``. Bodies are gzip (no timestamp in the header) of UTF-8 JSON Lines, one
line per rejected record, chunks joined, in dead-letter offset order; the same
range always gives the same keys and the same bytes.

A range never splits a chunk set: it ends after the last record that leaves
no set open. Only a set still incomplete after ``CHUNK_WAIT_S`` is archived as
fragments (one line per chunk, with its chunk coordinates), which loses
nothing and lets the partition move on.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.rejects import Assembler, Rejected, StoredDeadLetter, assemble

CUT_METADATA = "cio.archive.cut="
# How long an incomplete chunk set may hold back the rest of its partition: the
# worker writes a set in one go, so a set still open after five minutes was
# cut short by a crash (the worker then writes it again, whole).
CHUNK_WAIT_S = 300.0
# Waits between attempts at a failing range: 2, 4, 8, ... seconds, at most this.
RETRY_MAX_S = 60.0
TOPIC_NAME = re.compile(r"[^A-Za-z0-9._-]")

Decode = Callable[[str, bytes | None], dict[str, Any] | None]


@dataclass(frozen=True, slots=True)
class FlushLimits:
    max_records: int
    max_bytes: int
    max_age_s: float
    chunk_wait_s: float = CHUNK_WAIT_S


def flush_due(
    count: int,
    buffered_bytes: int,
    oldest_at: float | None,
    limits: FlushLimits,
    now: float,
) -> bool:
    """True when a partition's buffer should be archived now."""
    if not count or oldest_at is None:
        return False
    return (
        count >= limits.max_records
        or buffered_bytes >= limits.max_bytes
        or now - oldest_at >= limits.max_age_s
    )


def plan_cut(
    records: Sequence[StoredDeadLetter],
    read_at: Sequence[float],
    limits: FlushLimits,
    now: float,
    *,
    due: bool,
) -> int | None:
    """The last offset of the range to archive now, or None to wait.

    A range holds at most ``max_records`` records or about ``max_bytes`` bytes
    and ends after a record that leaves no chunk set open (past the limit when
    a set straddles it). If
    the very first record opens a set that has waited ``chunk_wait_s``, the
    range takes everything buffered and the incomplete set goes as fragments.
    """
    if not records or not due:
        return None
    assembler = Assembler()
    cut, size = None, 0
    for count, record in enumerate(records, start=1):
        assembler.add(record)
        size += record.size
        if assembler.is_settled:
            cut = record.offset
            if count >= limits.max_records or size >= limits.max_bytes:
                break
    if cut is not None:
        return cut
    if now - read_at[0] >= limits.chunk_wait_s:
        return records[-1].offset
    return None


def parse_cut(metadata: str | None, committed: int) -> int | None:
    """The range end a previous owner committed to, or None."""
    if not metadata or not metadata.startswith(CUT_METADATA):
        return None
    try:
        cut = int(metadata[len(CUT_METADATA) :])
    except ValueError:
        return None
    return cut if cut >= committed else None


def retry_delay_s(failures: int) -> float:
    """Seconds before the next attempt at a range that failed ``failures`` times."""
    return float(min(RETRY_MAX_S, 2 ** min(failures, 6)))


def object_key(
    prefix: str, source_topic: str, day: str, partition: int, first: int, last: int
) -> str:
    """The S3 key of one archive object (see the module docstring)."""
    topic = TOPIC_NAME.sub("_", source_topic).strip(".") or "_unknown"
    name = f"part-{partition:04d}-{first:020d}-{last:020d}.jsonl.gz"
    parts = [prefix.strip("/"), topic, f"dt={day}", name]
    return "/".join(p for p in parts if p)


def day_of(timestamp_ms: int) -> str:
    """The UTC date of a Kafka timestamp, or "unknown" when there is none."""
    if timestamp_ms < 0:
        return "unknown"
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).strftime("%Y-%m-%d")


def archive_line(rejected: Rejected, decoded: dict[str, Any] | None) -> dict[str, Any]:
    """One JSON Lines record: the original bytes, why, and where it was."""
    first = rejected.first
    reasons = first.reasons()
    value = rejected.value
    chunk = first.chunk() if rejected.fragment else None
    return {
        "dead_letter": {
            "topic": first.topic,
            "partition": first.partition,
            "offset": first.offset,
            "offsets": [part.offset for part in rejected.parts],
            "timestamp": first.timestamp_ms,
        },
        "source": {
            "topic": reasons.get("source.topic"),
            "partition": _int(reasons.get("source.partition")),
            "offset": _int(reasons.get("source.offset")),
            "timestamp": _int(reasons.get("source.timestamp")),
        },
        "reject": {
            "stage": reasons.get("stage"),
            "reason": reasons.get("reason"),
            "field": reasons.get("field") or None,
            "message": reasons.get("message"),
            "attempts": _int(reasons.get("attempts")),
            "worker_version": reasons.get("worker.version"),
        },
        "key": _b64(rejected.key),
        "value": _b64(value),
        "value_bytes": None if value is None else len(value),
        "value_sha256": None if value is None else hashlib.sha256(value).hexdigest(),
        "headers": [[name, _b64(_bytes(v))] for name, v in rejected.headers],
        "decoded": decoded,
        "fragment": None
        if chunk is None
        else {
            "index": chunk.index,
            "count": chunk.count,
            "original_bytes": chunk.original_size,
            "original_sha256": chunk.original_sha256,
        },
    }


@dataclass(frozen=True, slots=True)
class ArchiveObject:
    """One object to store: its key, gzip body and what it holds."""

    key: str
    body: bytes
    lines: int
    fragments: int


def build_objects(
    records: Sequence[StoredDeadLetter],
    partition: int,
    first: int,
    last: int,
    prefix: str,
    decode: Decode,
) -> list[ArchiveObject]:
    """Every object for the range ``first..last`` of ``records``, in key order."""
    groups: dict[tuple[str, str], list[tuple[bytes, bool]]] = {}
    for rejected in assemble(records):
        head = rejected.first
        topic = head.reasons().get("source.topic", "")
        decoded = None if rejected.fragment else decode(topic, rejected.value)
        line = json.dumps(
            archive_line(rejected, decoded),
            separators=(",", ":"),
            ensure_ascii=False,
            default=str,
        )
        group = groups.setdefault((topic, day_of(head.timestamp_ms)), [])
        group.append((line.encode(), rejected.fragment))
    return [
        ArchiveObject(
            object_key(prefix, topic, day, partition, first, last),
            gzip.compress(
                b"".join(line + b"\n" for line, _ in lines), compresslevel=6, mtime=0
            ),
            len(lines),
            sum(1 for _, fragment in lines if fragment),
        )
        for (topic, day), lines in sorted(groups.items())
    ]


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


@dataclass(slots=True)
class PartitionArchive:
    """One dead-letter partition's buffer and where its next range starts."""

    partition: int
    start: int | None = None
    records: list[StoredDeadLetter] = field(default_factory=list)
    read_at: list[float] = field(default_factory=list)
    buffered_bytes: int = 0
    cut: int | None = None
    cut_committed: bool = False
    failures: int = 0
    retry_at: float = 0.0
    eof: int | None = None
    end_at_start: int = 0
    paused: bool = False

    def add(self, record: StoredDeadLetter, now: float) -> None:
        if self.start is None:
            self.start = record.offset
        self.records.append(record)
        self.read_at.append(now)
        self.buffered_bytes += record.size
        self.eof = None

    def take_through(self, cut: int) -> list[StoredDeadLetter]:
        """Remove and return the buffered records up to ``cut``."""
        count = sum(1 for r in self.records if r.offset <= cut)
        taken = self.records[:count]
        del self.records[:count], self.read_at[:count]
        self.buffered_bytes -= sum(r.size for r in taken)
        return taken
