"""Unit tests of worker.logs: the Kafka clients' log lines as structured events."""

from __future__ import annotations

import logging

import pytest
from structlog.testing import capture_logs

from worker import logs
from worker.logs import KAFKA_LOGGER

REFUSED = "b: Connect failed: Connection refused (after {}ms in state CONNECT)"


def client_line(text: str, level: int = logging.ERROR) -> None:
    """Log a line as confluent-kafka does: '%s [%s] %s' with facility and client."""
    KAFKA_LOGGER.log(level, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", text)


def test_kafka_client_line_becomes_one_event_with_its_parts() -> None:
    """A librdkafka line is a kafka_client_log event with facility and client."""
    with capture_logs() as events:
        client_line("a line seen once " + str(id(object())))

    (event,) = events
    assert event["event"] == "kafka_client_log"
    assert (event["facility"], event["client"]) == ("FAIL", "rdkafka#consumer-1")
    assert event["log_level"] == "error"
    assert event["repeated"] == 0


def test_kafka_client_repeats_held_back_then_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A line repeating within a minute (timings aside) is written once; the
    next one after the minute says how many were held back."""
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    with capture_logs() as events:
        for attempt in range(50):
            client_line(REFUSED.format(attempt))
        now[0] += logs.REPEAT_INTERVAL_S + 1
        client_line(REFUSED.format(99))

    assert [e["repeated"] for e in events] == [0, 49]


def test_kafka_client_debug_lines_dropped_by_default() -> None:
    """librdkafka's debug output is not written unless asked for."""
    with capture_logs() as events:
        client_line("debug detail", logging.DEBUG)

    assert events == []
