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
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
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
# librdkafka does not always return within the timeout it is given: after a
# broker restart, send_offsets_to_transaction was seen waiting forever on a
# coordinator request (librdkafka issue 5456). Every blocking call runs on the
# producer's own thread; past its timeout plus this grace the producer is given
# up and a new one, with the same transactional id, takes over.
CALL_GRACE_S = 5.0
# An abort that times out this many times in a row (a producer whose requests to
# the transaction coordinator stay queued after a broker restart) is given up
# the same way: the new producer's init_transactions aborts the open transaction.
ABORT_FAILURES_BEFORE_RESTART = 2
# A producer given up in the middle of a call keeps its thread until librdkafka
# returns from that call, which may be never. Once this many given-up producers
# are still stuck when another is given up, the worker stops instead, so that
# its restart starts clean rather than piling up threads and connections.
MAX_STUCK_PRODUCERS = 3
# How often a wait for a producer call looks at the shutdown deadline.
WAIT_SLICE_S = 0.1
# Errors meaning another producer took over this transactional id, or the group
# moved on without this member: the worker must stop, never retry.
FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    }
)
# Errors after which the producer's message sequence numbers are in doubt:
# messages of the transaction failed delivery, or the broker did not answer in
# time (it was away), so the sequence numbers librdkafka keeps may run ahead of
# what the broker stored. librdkafka 2.16 aborts such a transaction without
# bumping the epoch; the next one then fails with OUT_OF_ORDER_SEQUENCE_NUMBER,
# and a send_offsets_to_transaction in progress at that moment never returns.
# A new producer starts with a new epoch and fresh sequence numbers instead.
SEQUENCE_IN_DOUBT_CODES = frozenset(
    {
        KafkaError._INCONSISTENT,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
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


class _UnfinishedError(Exception):
    """A producer call did not return in time (stuck, or the shutdown deadline
    came first); the producer's state is unknown and it must be given up."""


class _Caller:
    """Runs one producer's blocking calls on a daemon thread of its own, so the
    loop's thread can stop waiting for a call that librdkafka does not end. The
    thread holds the producer until it exits: a producer given up in the middle
    of a call is dropped only if that call ever returns."""

    def __init__(self, producer: Any) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._run, args=(producer,), name="cio-txn", daemon=True
        )
        self.thread.start()

    def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((future, function, args))
        return future

    def retire(self) -> None:
        """Stop after the calls already submitted; then drop the producer."""
        self._jobs.put(None)

    def _run(self, producer: Any) -> None:
        while (job := self._jobs.get()) is not None:
            future, function, args = job
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to the waiting thread
                future.set_exception(exc)
            del job, future, function, args
        # Anything still queued (the transaction of a producer given up) is
        # dropped: the new producer's init_transactions aborts it on the broker.
        with contextlib.suppress(Exception):
            producer.flush(0)


class Committer:
    """Owns the transactional producer; used by one thread at a time.

    No call blocks that thread for longer than a producer call's timeout plus
    CALL_GRACE_S, nor past ``deadline()`` (the shutdown's), whatever librdkafka
    does: a producer that does not answer in time is given up and replaced.
    """

    def __init__(
        self,
        new_producer: Callable[[], Producer],
        dead_letter_topic: str,
        state_topic: str,
        *,
        deadline: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._new_producer = new_producer
        self._deadline = deadline
        self._clock = clock
        self._producer: Any | None = new_producer()
        self._caller = _Caller(self._producer)
        self._needs_init = False
        self._needs_abort = False
        self._abort_failures = 0
        self._retired: list[_Caller] = []
        self._dead_letter_topic = dead_letter_topic
        self._state_topic = state_topic
        self.transactions = 0

    def start(self) -> None:
        """Register the transactional id, fencing any older producer that used it."""
        assert self._producer is not None
        try:
            self._call(self._producer.init_transactions)
        except (KafkaException, _UnfinishedError) as exc:
            reason = exc.args[0].str() if isinstance(exc, KafkaException) else exc
            raise TransactionError(
                f"cannot initialise transactions: {reason}; the broker "
                "must support transactions (transaction.state.log settings)"
            ) from exc

    def commit(
        self,
        dead_letters: Sequence[DeadLetter],
        state_updates: Sequence[tuple[int, StateUpdate]],
        offsets: dict[tuple[str, int], int],
        group_metadata: Any | None,
    ) -> int:
        """Write everything in one transaction; return how many transactions
        were committed (0 when there was nothing to write, else 1). Raise
        TransactionError on failure."""
        if not dead_letters and not state_updates and not offsets:
            return 0
        deadline = self._deadline()
        if deadline is not None and self._clock() >= deadline:
            raise TransactionAbortedError(
                "not committed: the shutdown deadline has passed"
            )
        try:
            self._prepare()
            producer = self._producer
            assert producer is not None
            self._call(producer.begin_transaction, timed=False)
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
                self._call(
                    producer.send_offsets_to_transaction,
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                    group_metadata,
                )
            self._commit_with_retries()
        except KafkaException as exc:
            self._abort_after(exc)
        except _UnfinishedError as exc:
            self._give_up(str(exc))
            raise TransactionAbortedError(
                f"transaction not finished: {exc}; it will be committed again"
            ) from exc
        self.transactions += 1
        return 1

    def _call(
        self, function: Callable[..., Any], *args: Any, timed: bool = True
    ) -> Any:
        """Run one blocking producer call on the producer's thread and return its
        result (or raise its KafkaException). ``timed`` calls get the timeout as
        their last argument, cut to the deadline. Raises _UnfinishedError when the
        call has not returned within that timeout plus CALL_GRACE_S, or by the
        deadline, whichever comes first."""
        started = self._clock()
        limit = started + TRANSACTION_TIMEOUT_S + CALL_GRACE_S
        timeout_s = TRANSACTION_TIMEOUT_S
        deadline = self._deadline()
        if deadline is not None:
            limit = min(limit, deadline)
            timeout_s = max(min(timeout_s, deadline - started), 0.001)
        future = self._caller.submit(function, *args, *([timeout_s] if timed else []))
        while True:
            remaining = limit - self._clock()
            try:
                return future.result(timeout=min(max(remaining, 0.0), WAIT_SLICE_S))
            except FutureTimeout:
                deadline = self._deadline()  # a stop may have been asked meanwhile
                if deadline is not None:
                    limit = min(limit, deadline)
                if self._clock() >= limit:
                    raise _UnfinishedError(
                        f"{getattr(function, '__name__', 'call')} did not return "
                        f"within {self._clock() - started:.1f} s"
                    ) from None

    def _prepare(self) -> None:
        """Finish what a failed transaction left behind: its abort, or a new
        producer's registration (which aborts the old producer's transaction on
        the broker). Raises TransactionAbortedError while that cannot be done."""
        if self._needs_abort:
            self._finish_abort()
        if self._producer is None:
            self._producer = self._new_producer()
            self._caller = _Caller(self._producer)
            self._needs_init = True
        if self._needs_init:
            try:
                self._call(self._producer.init_transactions)
            except KafkaException as exc:
                error = exc.args[0]
                self._stop_if_fenced(error, exc)
                if error.fatal():
                    self._give_up(error.str())
                raise TransactionAbortedError(
                    f"new transactional producer not ready ({error.str()}); retrying"
                ) from exc
            self._needs_init = False

    def _commit_with_retries(self) -> None:
        assert self._producer is not None
        for attempt in range(1, COMMIT_RETRIES + 1):
            try:
                self._call(self._producer.commit_transaction)
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
        self._stop_if_fenced(error, exc)
        if error.fatal() or error.code() in SEQUENCE_IN_DOUBT_CODES:
            # The producer cannot go on (say, the coordinator lost the open
            # transaction in a broker restart), or should not: start a new one
            # with the same id, which aborts whatever the old one left open.
            self._give_up(error.str())
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
        abort is resumed before the next transaction begins. A producer whose
        abort does not return, or keeps failing, is given up instead."""
        assert self._producer is not None
        try:
            self._call(self._producer.abort_transaction)
        except _UnfinishedError as exc:
            self._give_up(str(exc))
            return
        except KafkaException as exc:
            error = exc.args[0]
            self._stop_if_fenced(error, exc)
            self._abort_failures += 1
            if error.fatal() or self._abort_failures >= ABORT_FAILURES_BEFORE_RESTART:
                self._give_up(
                    f"abort_transaction failed {self._abort_failures} time(s): "
                    f"{error.str()}"
                )
                return
            raise TransactionAbortedError(
                f"transaction abort not finished ({error.str()}); retrying"
            ) from exc
        self._needs_abort = False
        self._abort_failures = 0

    def _give_up(self, reason: str) -> None:
        """Drop the producer, whatever state it is in; the next transaction
        starts with a new one, whose init_transactions aborts this one's open
        transaction on the broker and fences it."""
        stuck = [caller for caller in self._retired if caller.thread.is_alive()]
        log.warning(
            "transactional_producer_restarted", error=reason, stuck_before=len(stuck)
        )
        self._caller.retire()
        self._retired = [*stuck, self._caller]
        self._producer = None
        self._needs_init = False
        self._needs_abort = False
        self._abort_failures = 0
        if len(stuck) >= MAX_STUCK_PRODUCERS:
            raise TransactionError(
                f"{len(stuck)} transactional producers given up earlier are still "
                "stuck in calls the Kafka client never returned from; stopping so "
                "that a restart starts clean (it re-sends only the batches of the "
                "unfinished transactions)"
            )

    @staticmethod
    def _stop_if_fenced(error: KafkaError, exc: KafkaException) -> None:
        if error.code() in FENCED_CODES:
            raise TransactionError(
                f"this worker was fenced ({error.str()}): a newer replica uses its "
                "transactional id, or the group gave its partitions away; stopping. "
                "Restarting re-sends only the batches of the failed transaction"
            ) from exc

    def close(self, timeout_s: float = TRANSACTION_TIMEOUT_S) -> None:
        """Flush and drop the producer, waiting at most ``timeout_s`` (cut to the
        deadline, with a second's floor); a producer given up is not waited for."""
        producer, caller = self._producer, self._caller
        self._producer = None
        if producer is None:
            return
        deadline = self._deadline()
        if deadline is not None:
            timeout_s = min(timeout_s, max(deadline - self._clock(), 1.0))
        future = caller.submit(producer.flush, timeout_s)
        caller.retire()
        try:
            future.result(timeout=timeout_s + CALL_GRACE_S)
        except FutureTimeout:
            log.warning("producer_close_failed", error="flush did not return")
            return
        except KafkaException as exc:
            log.warning("producer_close_failed", error=exc.args[0].str())
        del producer  # the caller's thread drops the last reference as it ends
        caller.thread.join(timeout_s)
