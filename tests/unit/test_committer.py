"""Settling in one transaction, and what happens when a transaction fails."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from worker import committer as committer_module
from worker.committer import (
    Committer,
    DeadLetter,
    TransactionAbortedError,
    TransactionError,
)
from worker.state import StateUpdate


class FakeProducer:
    """Records transactional calls; raises the scripted errors in order."""

    def __init__(self, failures: dict[str, list[KafkaError]] | None = None) -> None:
        self.calls: list[str] = []
        self.produced: list[tuple[str, Any]] = []
        self.failures = failures or {}

    def _call(self, name: str) -> None:
        self.calls.append(name)
        queue = self.failures.get(name)
        if queue:
            raise KafkaException(queue.pop(0))

    def init_transactions(self, timeout: float) -> None:
        self._call("init")

    def begin_transaction(self) -> None:
        self._call("begin")

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produced.append((topic, kwargs))

    def send_offsets_to_transaction(
        self, offsets: Any, metadata: Any, timeout: float
    ) -> None:
        self._call("offsets")

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")

    def flush(self, timeout: float) -> int:
        return 0


def _committer(*producers: FakeProducer) -> Committer:
    queue = list(producers)
    committer = Committer(lambda: queue.pop(0), "dead", "state")
    committer.start()
    return committer


def _commit(committer: Committer) -> None:
    committer.commit(
        [DeadLetter(b"k", b"v", [])],
        [(0, StateUpdate(b"p\x00email:a", b"1"))],
        {("persons", 0): 10},
        group_metadata=object(),
    )


def test_commit_writes_dead_letters_state_and_offsets_in_one_transaction() -> None:
    """One settle step is one transaction: begin, records, offsets, commit."""
    producer = FakeProducer()
    committer = _committer(producer)

    _commit(committer)

    assert producer.calls == ["init", "begin", "offsets", "commit"]
    assert [topic for topic, _ in producer.produced] == ["dead", "state"]
    assert producer.produced[1][1]["partition"] == 0


def test_commit_nothing_to_write_starts_no_transaction() -> None:
    """An empty settle step costs no round trip."""
    producer = FakeProducer()
    committer = _committer(producer)

    committer.commit([], [], {}, group_metadata=object())

    assert producer.calls == ["init"]


def test_commit_retriable_commit_error_is_retried() -> None:
    """A retriable commit failure is retried within the same transaction."""
    error = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)
    producer = FakeProducer({"commit": [error]})
    committer = _committer(producer)

    _commit(committer)

    assert producer.calls[-2:] == ["commit", "commit"]


def test_commit_abortable_error_aborts_and_asks_to_commit_again() -> None:
    """A rebalance moving the generation aborts the transaction; the caller is
    told to commit the same content again."""
    error = KafkaError(KafkaError.ILLEGAL_GENERATION, "gen", txn_requires_abort=True)
    producer = FakeProducer({"offsets": [error]})
    committer = _committer(producer)

    with pytest.raises(TransactionAbortedError):
        _commit(committer)
    _commit(committer)

    assert producer.calls == [
        "init",
        "begin",
        "offsets",
        "abort",
        "begin",
        "offsets",
        "commit",
    ]


def test_commit_abort_timing_out_is_resumed_before_the_next_transaction() -> None:
    """With the broker away, the abort itself times out; it is finished before
    the next transaction begins, never skipped."""
    commit_error = KafkaError(KafkaError._TRANSPORT, "down", txn_requires_abort=True)
    abort_error = KafkaError(KafkaError._TIMED_OUT, "down", retriable=True)
    producer = FakeProducer({"commit": [commit_error], "abort": [abort_error]})
    committer = _committer(producer)

    with pytest.raises(TransactionAbortedError):
        _commit(committer)
    _commit(committer)

    assert producer.calls == [
        "init", "begin", "offsets", "commit", "abort",
        "abort", "begin", "offsets", "commit",
    ]  # fmt: skip


def test_commit_fatal_error_replaces_the_producer() -> None:
    """A producer in a fatal state (not fenced) is replaced by a new one with
    the same transactional id, and the content is committed again."""
    fatal = KafkaError(KafkaError.INVALID_TXN_STATE, "lost", fatal=True)
    first, second = FakeProducer({"commit": [fatal]}), FakeProducer()
    committer = _committer(first, second)

    with pytest.raises(TransactionAbortedError):
        _commit(committer)
    _commit(committer)

    assert second.calls == ["init", "begin", "offsets", "commit"]


def test_commit_fenced_stops_the_worker() -> None:
    """A newer producer with the same id fences this one: stop, never retry."""
    fenced = KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True)
    producer = FakeProducer({"commit": [fenced]})
    committer = _committer(producer)

    with pytest.raises(TransactionError, match="fenced") as caught:
        _commit(committer)

    assert not isinstance(caught.value, TransactionAbortedError)


# -- producer calls that do not return ------------------------------------------


class HangingProducer(FakeProducer):
    """A producer whose send_offsets or abort blocks until released, as
    librdkafka's do after some broker restarts."""

    def __init__(self, hang_on: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hang_on = hang_on
        self.release = threading.Event()

    def send_offsets_to_transaction(
        self, offsets: Any, metadata: Any, timeout: float
    ) -> None:
        self._call("offsets")
        if self.hang_on == "offsets":
            self.release.wait()

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")
        if self.hang_on == "abort":
            self.release.wait()


def test_commit_stuck_call_gives_the_producer_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call that outlives its timeout is abandoned within the bound, and a
    new producer with the same transactional id commits next time."""
    monkeypatch.setattr(committer_module, "TRANSACTION_TIMEOUT_S", 0.2)
    monkeypatch.setattr(committer_module, "CALL_GRACE_S", 0.2)
    first, second = HangingProducer("offsets"), FakeProducer()
    subject = _committer(first, second)
    started = time.monotonic()

    with pytest.raises(TransactionAbortedError, match="did not return"):
        _commit(subject)
    waited = time.monotonic() - started
    _commit(subject)

    assert waited < 1.5
    assert second.calls == ["init", "begin", "offsets", "commit"]
    first.release.set()


def test_commit_stops_once_given_up_producers_stay_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each producer given up keeps its thread while its call never returns:
    past MAX_STUCK_PRODUCERS still stuck, the next give-up stops the worker
    instead of leaving one more thread behind; one that returned meanwhile no
    longer counts."""
    monkeypatch.setattr(committer_module, "TRANSACTION_TIMEOUT_S", 0.1)
    monkeypatch.setattr(committer_module, "CALL_GRACE_S", 0.1)
    monkeypatch.setattr(committer_module, "MAX_STUCK_PRODUCERS", 2)
    hanging = [HangingProducer("offsets") for _ in range(4)]
    subject = _committer(*hanging)

    for _ in range(2):  # two given up, both still stuck
        with pytest.raises(TransactionAbortedError, match="did not return"):
            _commit(subject)
    hanging[0].release.set()  # the first one's call returns at last
    time.sleep(0.2)
    with pytest.raises(TransactionAbortedError, match="did not return"):
        _commit(subject)  # only one still stuck before this give-up: goes on
    with pytest.raises(TransactionError, match="still stuck") as stopped:
        _commit(subject)  # two stuck before this one: stops

    assert not isinstance(stopped.value, TransactionAbortedError)
    for producer in hanging:
        producer.release.set()


def test_commit_shutdown_deadline_cuts_a_stuck_call() -> None:
    """Once the worker is stopping, a stuck call ends at the deadline, and no
    new transaction starts after it."""
    stop: dict[str, float | None] = {"at": None}
    first, second = HangingProducer("offsets"), FakeProducer()
    queue = [first, second]
    subject = Committer(
        lambda: queue.pop(0), "dead", "state", deadline=lambda: stop["at"]
    )
    subject.start()
    threading.Timer(0.3, lambda: stop.update(at=time.monotonic() + 0.2)).start()
    started = time.monotonic()

    with pytest.raises(TransactionAbortedError):
        _commit(subject)
    waited = time.monotonic() - started
    with pytest.raises(TransactionAbortedError, match="deadline"):
        _commit(subject)

    assert waited < 1.5
    subject.close()
    first.release.set()


def test_commit_inconsistent_transaction_replaces_producer_without_abort() -> None:
    """Messages that timed out during an outage leave the producer's sequence
    numbers unusable: a new producer takes over instead of an abort."""
    error = KafkaError(
        KafkaError._INCONSISTENT, "400 message(s) failed", txn_requires_abort=True
    )
    first, second = FakeProducer({"commit": [error]}), FakeProducer()
    subject = _committer(first, second)

    with pytest.raises(TransactionAbortedError):
        _commit(subject)
    _commit(subject)

    assert first.calls == ["init", "begin", "offsets", "commit"]
    assert second.calls == ["init", "begin", "offsets", "commit"]


def test_commit_two_failed_aborts_replace_the_producer() -> None:
    """An abort that keeps timing out is not retried forever."""
    commit_error = KafkaError(KafkaError._TRANSPORT, "down", txn_requires_abort=True)
    timed_out = KafkaError(KafkaError._TIMED_OUT, "down", retriable=True)
    first = FakeProducer({"commit": [commit_error], "abort": [timed_out, timed_out]})
    second = FakeProducer()
    subject = _committer(first, second)

    with pytest.raises(TransactionAbortedError):
        _commit(subject)
    _commit(subject)

    assert first.calls[-2:] == ["abort", "abort"]
    assert second.calls == ["init", "begin", "offsets", "commit"]


def test_commit_new_producer_init_timing_out_is_retried() -> None:
    """A replacement producer whose init times out (the broker still away) is
    initialised again on the next commit."""
    fatal = KafkaError(KafkaError.INVALID_TXN_STATE, "lost", fatal=True)
    timed_out = KafkaError(KafkaError._TIMED_OUT, "down", retriable=True)
    first, second = (
        FakeProducer({"commit": [fatal]}),
        FakeProducer({"init": [timed_out]}),
    )
    subject = _committer(first, second)

    with pytest.raises(TransactionAbortedError):
        _commit(subject)
    with pytest.raises(TransactionAbortedError, match="not ready"):
        _commit(subject)
    _commit(subject)

    assert second.calls == ["init", "init", "begin", "offsets", "commit"]


def test_commit_fenced_during_abort_stops_the_worker() -> None:
    """Fencing seen while aborting means another worker took over: stop."""
    commit_error = KafkaError(KafkaError._TRANSPORT, "down", txn_requires_abort=True)
    fenced = KafkaError(KafkaError.PRODUCER_FENCED, "fenced", fatal=True)
    subject = _committer(FakeProducer({"commit": [commit_error], "abort": [fenced]}))

    with pytest.raises(TransactionError, match="fenced") as caught:
        _commit(subject)

    assert not isinstance(caught.value, TransactionAbortedError)
