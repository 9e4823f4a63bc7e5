"""Dead-letter records: the original key, value and headers, plus why.

A rejected record is written to the dead-letter topic unchanged, with headers
prefixed ``cio.`` saying which stage refused it (decode, validate, api), the
reason code, the field at fault, a message, where it came from, how many times
it was attempted and which worker version refused it. Nothing secret is ever in
them: the message is the worker's or the API's text about the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker import __version__

HEADER_PREFIX = "cio."
MAX_MESSAGE_CHARS = 1000


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
