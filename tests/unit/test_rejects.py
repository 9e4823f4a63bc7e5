"""Unit tests of worker.rejects: dead-letter headers."""

from __future__ import annotations

import pytest

from tests.unit.fakes import TIMESTAMP_NOT_AVAILABLE, FakeMessage
from worker import __version__
from worker.rejects import MAX_MESSAGE_CHARS, Reject, header_map, reject_headers

ORIGINAL = [("trace-id", b"abc"), ("empty", None), ("cio.stage", b"upstream")]


def message(**changes: object) -> FakeMessage:
    fields: dict[str, object] = {
        "value_bytes": b"\x00\x01",
        "topic_name": "person-events",
        "partition_number": 4,
        "offset_number": 1234,
        "header_list": list(ORIGINAL),
        "timestamp_ms": 1_700_000_000_123,
    }
    fields.update(changes)
    return FakeMessage(**fields)  # type: ignore[arg-type]


def test_reject_headers_original_first_then_every_cio_header() -> None:
    """The original headers come first, then one cio.* header per reason field."""
    reject = Reject("api", "too_long", "name is too long", "name", attempts=3)

    headers = reject_headers(message(), reject)

    assert headers[:3] == ORIGINAL
    assert headers[3:] == [
        ("cio.stage", b"api"),
        ("cio.reason", b"too_long"),
        ("cio.field", b"name"),
        ("cio.message", b"name is too long"),
        ("cio.source.topic", b"person-events"),
        ("cio.source.partition", b"4"),
        ("cio.source.offset", b"1234"),
        ("cio.source.timestamp", b"1700000000123"),
        ("cio.attempts", b"3"),
        ("cio.worker.version", __version__.encode()),
    ]


def test_reject_headers_no_original_headers_only_cio() -> None:
    """A record without headers gets exactly the ten cio.* headers."""
    reject = Reject("decode", "truncated_avro", "ends early")

    headers = reject_headers(message(header_list=None), reject)

    assert [name for name, _ in headers] == [
        "cio.stage",
        "cio.reason",
        "cio.field",
        "cio.message",
        "cio.source.topic",
        "cio.source.partition",
        "cio.source.offset",
        "cio.source.timestamp",
        "cio.attempts",
        "cio.worker.version",
    ]
    assert dict(headers)["cio.field"] == b""
    assert dict(headers)["cio.attempts"] == b"1"


def test_reject_headers_timestamp_not_available_is_minus_one() -> None:
    """A record without a Kafka timestamp says -1, not a meaningless number."""
    reject = Reject("decode", "bad_avro", "x")

    headers = reject_headers(message(timestamp_type=TIMESTAMP_NOT_AVAILABLE), reject)

    assert dict(headers)["cio.source.timestamp"] == b"-1"


@pytest.mark.parametrize(
    ("length", "kept"),
    [(0, 0), (999, 999), (1000, 1000), (1001, 1000), (5000, 1000)],
)
def test_reject_headers_message_truncated_to_1000_chars(length: int, kept: int) -> None:
    """The message header holds at most 1000 characters of the reason text."""
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    reject = Reject("validate", "r", text)

    headers = reject_headers(message(), reject)

    assert MAX_MESSAGE_CHARS == 1000
    assert dict(headers)["cio.message"] == text[:kept].encode()


def test_reject_headers_non_ascii_message_truncated_by_characters() -> None:
    """Truncation counts characters, and the header is that text in UTF-8."""
    reject = Reject("api", "r", "é" * 1500)

    headers = reject_headers(message(), reject)

    assert dict(headers)["cio.message"] == ("é" * 1000).encode()


def test_header_map_round_trip_returns_reject_fields() -> None:
    """header_map reads back the cio.* values, without the prefix, as text."""
    reject = Reject("api", "too_long", "naïve ✓", "name", attempts=2)
    headers = reject_headers(message(header_list=[("trace-id", b"abc")]), reject)

    values = header_map(headers)  # type: ignore[arg-type]

    assert values == {
        "stage": "api",
        "reason": "too_long",
        "field": "name",
        "message": "naïve ✓",
        "source.topic": "person-events",
        "source.partition": "4",
        "source.offset": "1234",
        "source.timestamp": "1700000000123",
        "attempts": "2",
        "worker.version": __version__,
    }


def test_header_map_repeated_header_last_wins() -> None:
    """When a cio.* header repeats, the later (worker's) value is the one read."""
    reject = Reject("api", "too_long", "m")
    headers = reject_headers(message(), reject)  # ORIGINAL holds cio.stage=upstream

    values = header_map(headers)  # type: ignore[arg-type]

    assert values["stage"] == "api"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, {}),
        ([], {}),
        ([("other", b"x")], {}),
        ([("cio.field", None)], {"field": ""}),
        ([("cio.reason", b"\xff")], {"reason": "\ufffd"}),
    ],
)
def test_header_map_edge_inputs(
    headers: list[tuple[str, bytes]] | None, expected: dict[str, str]
) -> None:
    """Missing, foreign, null and undecodable headers are handled without errors."""
    values = header_map(headers)

    assert values == expected
