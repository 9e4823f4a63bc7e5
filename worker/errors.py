"""The worker's exceptions, split by what the caller does with them.

::

    WorkerError                  root; never raised itself
    +-- TransientError           retry later: network, 5xx, throttling, broker outage
    |   `-- CredentialsError     401/403: pause delivery until the credentials work
    +-- InvalidRecordError       never retry: dead-letter the record with its reason
    |   +-- DecodeError          stage "decode": bytes that are not a valid record
    |   `-- ValidationError      stage "validate": a record Customer.io would refuse
    `-- ConfigError              stop at start-up with a message that says what to fix
"""

from __future__ import annotations


class WorkerError(Exception):
    """Root of every error the worker raises on purpose."""


class TransientError(WorkerError):
    """A condition expected to pass: retry with backoff, never dead-letter."""


class CredentialsError(TransientError):
    """The Track API refused the site id or API key (401 or 403)."""

    status: int | None = None


class InvalidRecordError(WorkerError):
    """A record that can never be delivered as it is.

    ``reason`` is a short stable code (``bad_avro``, ``event_name_too_long``);
    ``field`` names the record field at fault, when one is.
    """

    stage = "validate"

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


class DecodeError(InvalidRecordError):
    """The record's bytes do not decode with the configured schema."""

    stage = "decode"


class ValidationError(InvalidRecordError):
    """The decoded record breaks a mapping rule or a Customer.io limit."""

    stage = "validate"


class ConfigError(WorkerError):
    """The configuration is unusable; the message says what to change."""
