"""Test doubles shared by the unit tests: no broker, no network."""

from __future__ import annotations

from dataclasses import dataclass, field

# confluent_kafka.TIMESTAMP_CREATE_TIME; 0 is TIMESTAMP_NOT_AVAILABLE.
TIMESTAMP_CREATE_TIME = 1
TIMESTAMP_NOT_AVAILABLE = 0


@dataclass
class FakeMessage:
    """Stands in for confluent_kafka.Message with the same accessor methods."""

    value_bytes: bytes | None = b""
    topic_name: str = "persons"
    partition_number: int = 0
    offset_number: int = 0
    key_bytes: bytes | None = b"ann@example.com"
    header_list: list[tuple[str, bytes | None]] | None = field(default=None)
    timestamp_ms: int = 1_700_000_000_000
    timestamp_type: int = TIMESTAMP_CREATE_TIME

    def topic(self) -> str:
        return self.topic_name

    def partition(self) -> int:
        return self.partition_number

    def offset(self) -> int:
        return self.offset_number

    def key(self) -> bytes | None:
        return self.key_bytes

    def value(self) -> bytes | None:
        return self.value_bytes

    def headers(self) -> list[tuple[str, bytes | None]] | None:
        return self.header_list

    def timestamp(self) -> tuple[int, int]:
        return self.timestamp_type, self.timestamp_ms
