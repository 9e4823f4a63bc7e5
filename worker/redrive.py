"""Dead-letter redrive: dead-lettered records processed again, as they first came.

A dead letter carries the original key, value and headers and, in ``cio.*``
headers, where it came from. ``RedrivenRecord`` presents it to the pipeline as
the original record (same topic, partition, offset and timestamp), so an event
without an id gets the same derived id as the first time and state decisions
use the right partition. A record that fails again goes back to the dead-letter
topic with its attempt count raised by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from worker.rejects import Assembler, Rejected, StoredDeadLetter, header_map

log = structlog.get_logger(__name__)

TIMESTAMP_CREATE_TIME = 1


class RedrivenRecord:
    """A dead letter seen as the record it was, with the same accessors as a
    Kafka message: original key, value, headers and coordinates."""

    __slots__ = ("_headers", "_key", "_reasons", "_value", "attempts")

    def __init__(self, rejected: Rejected) -> None:
        first = rejected.first
        self._reasons = first.reasons()
        self._headers = rejected.headers
        self._key = rejected.key
        self._value = rejected.value
        self.attempts = _int(self._reasons.get("attempts"), 1) + 1

    def topic(self) -> str:
        return self._reasons.get("source.topic", "")

    def partition(self) -> int:
        return _int(self._reasons.get("source.partition"), 0)

    def offset(self) -> int:
        return _int(self._reasons.get("source.offset"), -1)

    def timestamp(self) -> tuple[int, int]:
        value = _int(self._reasons.get("source.timestamp"), -1)
        return (TIMESTAMP_CREATE_TIME if value >= 0 else 0, value)

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        return list(self._headers)

    def error(self) -> None:
        return None


class RedriveReader:
    """Turns dead-letter messages into redriven records, joining chunks.

    Returns None for a chunk whose set is not complete yet, and for a fragment
    (a chunk set that cannot be joined), which stays on the dead-letter topic
    for a person to look at.
    """

    def __init__(self) -> None:
        self._assemblers: dict[int, Assembler] = {}

    def __call__(self, message: Any) -> RedrivenRecord | None:
        assembler = self._assemblers.setdefault(message.partition(), Assembler())
        done = assembler.add(StoredDeadLetter.from_message(message))
        records = [r for r in done if not r.fragment]
        if len(records) < len(done):
            log.warning("redrive_fragment_kept", offset=message.offset())
        return RedrivenRecord(records[-1]) if records else None


@dataclass(frozen=True, slots=True)
class RedriveFilter:
    """Which dead letters to redrive; an empty field matches everything."""

    reasons: frozenset[str] = frozenset()
    stages: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    until_ms: int | None = None

    def __call__(self, message: Any) -> bool:
        reasons = header_map(message.headers())
        if self.reasons and reasons.get("reason") not in self.reasons:
            return False
        if self.stages and reasons.get("stage") not in self.stages:
            return False
        if self.source_topics and reasons.get("source.topic") not in self.source_topics:
            return False
        if self.until_ms is not None:
            _, written_ms = message.timestamp()
            if written_ms > self.until_ms:
                return False
        return True


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
