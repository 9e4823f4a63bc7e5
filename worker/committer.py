"""Settling delivered batches in one Kafka transaction.

After the API accepted a batch, three things must happen together or not at
all: its dead letters are written, its state updates are written, and the input
offsets move past it. They go into one transaction, with the offsets sent via
``send_offsets_to_transaction`` and the consumer's group metadata, so a crash
before the commit leaves none of them visible (read_committed) and the batch is
simply sent again; and a zombie whose partitions were given to another member
is fenced by the group generation carried in that metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition

from worker.errors import WorkerError
from worker.state import StateUpdate

log = structlog.get_logger(__name__)

TRANSACTION_TIMEOUT_S = 10.0
# A retriable commit error (broker busy, coordinator moving) is retried this
# often before the transaction is aborted and its content committed again.
COMMIT_RETRIES = 3
# Errors meaning another producer took over this transactional id, or the group
# moved on without this member: the worker must stop, never retry.
FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)


class TransactionError(WorkerError):
    """A transaction could not be committed and the producer cannot go on; the
    worker must restart from the last committed offsets (nothing of the failed
    transaction is visible, so its batches are simply sent again)."""


class TransactionAbortedError(TransactionError):
    """The transaction was aborted but the producer can go on (a rebalance moved
    the group's generation, a broker restarted): commit the same content again
    in a new transaction once the cause has passed."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]]


class Committer:
    """Owns the transactional producer; used only from the consumer's thread."""

    def __init__(
        self,
        new_producer: Callable[[], Producer],
        dead_letter_topic: str,
        state_topic: str,
    ) -> None:
        self._new_producer = new_producer
        self._producer = new_producer()
        self._needs_abort = False
        self._dead_letter_topic = dead_letter_topic
        self._state_topic = state_topic
        self.transactions = 0

    def start(self) -> None:
        """Register the transactional id, fencing any older producer that used it."""
        try:
            self._producer.init_transactions(TRANSACTION_TIMEOUT_S)
        except KafkaException as exc:
            raise TransactionError(
                f"cannot initialise transactions: {exc.args[0].str()}; the broker "
                "must support transactions (transaction.state.log settings)"
            ) from exc

    def commit(
        self,
        dead_letters: Sequence[DeadLetter],
        state_updates: Sequence[tuple[int, StateUpdate]],
        offsets: dict[tuple[str, int], int],
        group_metadata: Any | None,
    ) -> None:
        """Write everything in one transaction; raise TransactionError on failure."""
        if not dead_letters and not state_updates and not offsets:
            return
        if self._needs_abort:
            self._finish_abort()
        producer = self._producer
        try:
            producer.begin_transaction()
            for letter in dead_letters:
                producer.produce(
                    self._dead_letter_topic,
                    key=letter.key,
                    value=letter.value,
                    headers=letter.headers,
                )
            for partition, update in state_updates:
                producer.produce(
                    self._state_topic,
                    key=update.key,
                    value=update.value,
                    partition=partition,
                )
            if offsets and group_metadata is not None:
                producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    group_metadata,
                    TRANSACTION_TIMEOUT_S,
                )
            self._commit_with_retries()
        except KafkaException as exc:
            self._abort_after(exc)
        self.transactions += 1

    def _commit_with_retries(self) -> None:
        for attempt in range(1, COMMIT_RETRIES + 1):
            try:
                self._producer.commit_transaction(TRANSACTION_TIMEOUT_S)
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not error.retriable() or attempt == COMMIT_RETRIES:
                    raise
                log.warning(
                    "transaction_commit_retry", attempt=attempt, error=error.str()
                )

    def _abort_after(self, exc: KafkaException) -> None:
        error = exc.args[0]
        if error.code() in FENCED_CODES:
            raise TransactionError(
                f"this worker was fenced ({error.str()}): a newer replica uses its "
                "transactional id, or the group gave its partitions away; stopping. "
                "Restarting re-sends only the batches of the failed transaction"
            ) from exc
        if error.fatal():
            # The producer cannot go on (say, the coordinator lost the open
            # transaction in a broker restart): start a new one with the same
            # id, which aborts whatever the old one left open.
            log.warning("transactional_producer_restarted", error=error.str())
            self._replace_producer()
            raise TransactionAbortedError(
                f"transaction failed: {error.str()}; it will be committed again"
            ) from exc
        self._needs_abort = True
        self._finish_abort()
        raise TransactionAbortedError(
            f"transaction aborted: {error.str()}; it will be committed again"
        ) from exc

    def _finish_abort(self) -> None:
        """Abort the failed transaction; if the broker cannot be reached, the
        abort is resumed before the next transaction begins."""
        try:
            self._producer.abort_transaction(TRANSACTION_TIMEOUT_S)
        except KafkaException as exc:
            error = exc.args[0]
            if error.fatal():
                log.warning("transactional_producer_restarted", error=error.str())
                self._replace_producer()
                return
            raise TransactionAbortedError(
                f"transaction abort not finished ({error.str()}); retrying"
            ) from exc
        self._needs_abort = False

    def _replace_producer(self) -> None:
        # The old producer is in a fatal state; it is dropped whatever flush says.
        with contextlib.suppress(KafkaException):
            self._producer.flush(0)
        self._producer = self._new_producer()
        self._needs_abort = False
        self.start()

    def close(self, timeout_s: float = TRANSACTION_TIMEOUT_S) -> None:
        try:
            self._producer.flush(timeout_s)
        except KafkaException as exc:
            log.warning("producer_close_failed", error=exc.args[0].str())
