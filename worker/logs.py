"""Logging set-up: structlog events, JSON when not on a terminal.

The Kafka clients' own log lines (librdkafka's) come through ``KAFKA_LOGGER``
as ``kafka_client_log`` events in the same format, instead of raw text on
stderr; a line that repeats (a broker that stays unreachable is reported on
every reconnect) is written once a minute with the count of its repeats.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import structlog

REPEAT_INTERVAL_S = 60.0
MAX_REMEMBERED_LINES = 1_000
# The parts of a line that change from one repeat to the next.
_TIMINGS = re.compile(r"\(after \d+ms[^)]*\)|\d+ms")


class _KafkaLogBridge(logging.Handler):
    """librdkafka log records as structlog events, repeats held back."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[str, list[float]] = {}  # line -> [last written, held]

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        facility, client, text = (
            args if len(args) == 3 else ("", "", record.getMessage())
        )
        key = f"{facility}|{_TIMINGS.sub('', str(text))}"
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < REPEAT_INTERVAL_S:
            seen[1] += 1
            return
        if len(self._seen) >= MAX_REMEMBERED_LINES:
            self._seen.clear()
        self._seen[key] = [now, 0]
        structlog.get_logger("kafka").log(
            record.levelno,
            "kafka_client_log",
            facility=facility,
            client=client,
            message=text,
            repeated=int(seen[1]) if seen else 0,
        )


KAFKA_LOGGER = logging.getLogger("cio_worker.kafka")
KAFKA_LOGGER.addHandler(_KafkaLogBridge())
KAFKA_LOGGER.setLevel(logging.INFO)  # librdkafka's debug output only on request
KAFKA_LOGGER.propagate = False


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Send structured events to stderr as JSON, or as colour text on a terminal."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer()
    )
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if not console:
        processors.append(structlog.processors.dict_tracebacks)
    processors.append(renderer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
