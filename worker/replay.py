"""Planning offset ranges: for ``replay``, ``dlq redrive`` and ``offsets reset``.

A position is the beginning, the end, an offset, or a time (the first record
at or after it). An offset before a partition's log start or past its end is
an error that names both, never a silent jump to the nearest valid offset.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaException, TopicPartition

from worker.errors import ConfigError

TIMEOUT_S = 10.0

TP = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a range starts or ends."""

    kind: Literal["beginning", "end", "offset", "time"]
    value: int = 0  # the offset, or the time in Unix milliseconds

    def describe(self) -> str:
        if self.kind in ("beginning", "end"):
            return self.kind
        if self.kind == "offset":
            return f"offset {self.value}"
        moment = datetime.fromtimestamp(self.value / 1000, UTC)
        return f"time {moment.isoformat()}"


def parse_time(text: str) -> int:
    """Unix milliseconds from ISO-8601 (no zone means UTC) or a Unix number:
    up to 11 digits is seconds (until the year 5138), more is milliseconds."""
    if text.isascii() and text.isdigit():
        return int(text) * 1000 if len(text) <= 11 else int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"cannot read time {text!r}: use ISO-8601 such as 2026-12-01T09:00:00Z "
            "or Unix seconds or milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def partitions_of(consumer: Consumer, topic: str) -> list[int]:
    """The partition numbers of a topic, or ConfigError if it does not exist."""
    metadata = consumer.list_topics(topic, timeout=TIMEOUT_S).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise ConfigError(f"topic {topic} does not exist")
    return sorted(metadata.partitions)


def resolve(consumer: Consumer, topic: str, partition: int, position: Position) -> int:
    """The offset a position means in one partition; ConfigError if outside it."""
    low, high = consumer.get_watermark_offsets(
        TopicPartition(topic, partition), timeout=TIMEOUT_S
    )
    if position.kind == "beginning":
        return int(low)
    if position.kind == "end":
        return int(high)
    if position.kind == "offset":
        if position.value < low:
            raise ConfigError(
                f"offset {position.value} is before the log start {low} of "
                f"{topic}[{partition}] (older records were deleted); use {low} or "
                "--from-beginning"
            )
        if position.value > high:
            raise ConfigError(
                f"offset {position.value} is past the end {high} of "
                f"{topic}[{partition}]"
            )
        return position.value
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, partition, position.value)], timeout=TIMEOUT_S
        )[0]
    except KafkaException as exc:
        raise ConfigError(f"cannot look up offsets by time: {exc.args[0]}") from exc
    return int(found.offset) if found.offset >= 0 else int(high)


def plan_ranges(
    consumer: Consumer,
    topic: str,
    partitions: list[int] | None,
    start: Position,
    end: Position,
) -> dict[TP, tuple[int, int]]:
    """``[start, end)`` per partition; ConfigError for a bad partition or offset."""
    existing = partitions_of(consumer, topic)
    chosen = partitions if partitions is not None else existing
    unknown = sorted(set(chosen) - set(existing))
    if unknown:
        raise ConfigError(
            f"{topic} has partitions {existing[0]}..{existing[-1]}; no partition "
            f"{', '.join(map(str, unknown))}"
        )
    ranges = {}
    for partition in chosen:
        first = resolve(consumer, topic, partition, start)
        last = resolve(consumer, topic, partition, end)
        if first > last:
            raise ConfigError(
                f"{topic}[{partition}]: start {first} is after end {last}"
            )
        ranges[(topic, partition)] = (first, last)
    return ranges


def describe_plan(
    ranges: dict[TP, tuple[int, int]], committed: dict[TP, int] | None = None
) -> str:
    """A table of the plan, one line per partition."""
    lines = []
    for (topic, partition), (first, last) in sorted(ranges.items()):
        if committed is None:
            lines.append(
                f"{topic}[{partition}]  {first} .. {last}  ({last - first} offsets)"
            )
        else:
            current = committed.get((topic, partition), -1)
            shown = "none" if current < 0 else str(current)
            lines.append(f"{topic}[{partition}]  committed {shown} -> {first}")
    return "\n".join(lines)


def committed_offsets(consumer: Consumer, tps: list[TP]) -> dict[TP, int]:
    """The group's committed offsets for some partitions (-1: none)."""
    result = consumer.committed(
        [TopicPartition(t, p) for t, p in tps], timeout=TIMEOUT_S
    )
    return {(tp.topic, tp.partition): int(tp.offset) for tp in result}


def group_members(admin: Any, group: str) -> int:
    """How many members the group has now (0 when it is empty or unknown)."""
    futures = admin.describe_consumer_groups([group], request_timeout=TIMEOUT_S)
    try:
        description = futures[group].result()
    except KafkaException:
        return 0
    return len(description.members)
