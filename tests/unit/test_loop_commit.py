"""The loop's commits: one transaction at a time on the commit thread, what
settles meanwhile goes into the next, and an aborted transaction's content is
queued again ahead of newer content. Fakes stand in for the producer and the
consumer; the loop's own bookkeeping is what is tested."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import wait
from typing import Any

import pytest

from worker.batcher import BatchLimits, PartitionBuffer
from worker.committer import DeadLetter, TransactionAbortedError
from worker.loop import COMMIT_SLOW_S, Worker
from worker.settings import Settings
from worker.state import PartitionState, StateUpdate

TP = ("events", 0)
OTHER = ("events", 1)


class FakeCommitter:
    """Records each commit; a commit waits for ``release`` when ``hold`` is set,
    and raises the next queued error, if any."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold = False
        self.started = threading.Event()
        self.release = threading.Event()
        self.errors: list[Exception] = []

    def commit(
        self,
        letters: list[DeadLetter],
        updates: list[tuple[int, StateUpdate]],
        offsets: dict[tuple[str, int], int],
        metadata: Any,
    ) -> int:
        self.calls.append(
            {"letters": list(letters), "updates": list(updates),
             "offsets": dict(offsets)}
        )  # fmt: skip
        self.started.set()
        if self.hold:
            assert self.release.wait(5), "test never released the commit"
        if self.errors:
            raise self.errors.pop(0)
        return 1

    def close(self) -> None:
        pass


class FakeConsumer:
    def consumer_group_metadata(self) -> str:
        return "group-metadata"


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[Worker]:
    monkeypatch.setenv("CIO_SITE_ID", "site")
    monkeypatch.setenv("CIO_API_KEY", "key")
    loop = Worker(Settings())
    loop._committer = FakeCommitter()  # type: ignore[assignment]
    loop._consumer = FakeConsumer()  # type: ignore[assignment]
    limits = BatchLimits(100, 100_000, 0.1)
    for tp in (TP, OTHER):
        loop._buffers[tp] = PartitionBuffer(tp[0], tp[1], limits)
    loop._states[0] = PartitionState()
    yield loop
    loop._txn_pool.shutdown(wait=True)
    loop._pool.shutdown(wait=True)


def _committer(loop: Worker) -> FakeCommitter:
    committer = loop._committer
    assert isinstance(committer, FakeCommitter)
    return committer


def _letter(name: str) -> DeadLetter:
    return DeadLetter(name.encode(), b"{}", [])


def _update(name: str) -> tuple[int, StateUpdate]:
    return 0, StateUpdate(name.encode(), b"v")


def _queue(loop: Worker, tp: tuple[str, int], offset: int, *names: str) -> None:
    loop._unsettled_offsets[tp] = offset
    loop._unsettled_letters.setdefault(tp, []).extend(_letter(n) for n in names)
    loop._pending_state.extend(_update(n) for n in names)


def _wait_done(loop: Worker) -> None:
    assert loop._txn is not None
    done, _ = wait([loop._txn], timeout=5)
    assert done


def _start_held(loop: Worker, tp: tuple[str, int], offset: int, *names: str) -> None:
    """Queue content and start its transaction, held until ``release``."""
    committer = _committer(loop)
    committer.hold = True
    _queue(loop, tp, offset, *names)
    loop._commit_in_background()
    assert committer.started.wait(5)


def _collect(loop: Worker) -> None:
    """Wait for the running transaction, then take its outcome (and start
    the next, if content waits)."""
    _wait_done(loop)
    loop._commit_in_background()


def test_what_settles_while_a_transaction_runs_goes_into_the_next(
    worker: Worker,
) -> None:
    committer = _committer(worker)
    _start_held(worker, TP, 10, "a")

    _queue(worker, TP, 20, "b")
    _queue(worker, OTHER, 5, "c")
    worker._commit_in_background()  # one is running: nothing new starts
    assert len(committer.calls) == 1

    committer.release.set()
    _collect(worker)  # collects the first, starts the second
    _collect(worker)

    assert [c["offsets"] for c in committer.calls] == [
        {TP: 10},
        {TP: 20, OTHER: 5},
    ]
    assert [d.key for d in committer.calls[1]["letters"]] == [b"b", b"c"]
    assert worker._txn is None
    assert not worker._has_uncommitted()


def test_an_aborted_transaction_is_queued_again_ahead_of_newer_content(
    worker: Worker,
) -> None:
    committer = _committer(worker)
    committer.errors.append(TransactionAbortedError("broker went away"))
    _start_held(worker, TP, 10, "a1", "a2")
    _queue(worker, TP, 20, "b")  # settled while the doomed one ran

    committer.release.set()
    _collect(worker)  # the abort: queued again, commit paused

    assert worker._unsettled_offsets == {TP: 20}
    assert [d.key for d in worker._unsettled_letters[TP]] == [b"a1", b"a2", b"b"]
    assert [u.key for _, u in worker._pending_state] == [b"a1", b"a2", b"b"]
    assert worker._retry_commit_at > 0  # waits before the next try
    assert len(committer.calls) == 1

    worker._retry_commit_at = 0.0
    worker._commit_in_background()
    _collect(worker)
    assert committer.calls[1]["offsets"] == {TP: 20}
    assert [d.key for d in committer.calls[1]["letters"]] == [b"a1", b"a2", b"b"]
    assert worker._aborted_in_a_row == 0


def test_a_waiting_commit_finishes_the_running_one_then_commits_the_rest(
    worker: Worker,
) -> None:
    committer = _committer(worker)
    _start_held(worker, TP, 10, "a")
    _queue(worker, OTHER, 7, "b")
    committer.release.set()

    assert worker._commit() is True

    assert [c["offsets"] for c in committer.calls] == [{TP: 10}, {OTHER: 7}]
    assert worker._txn is None
    assert not worker._has_uncommitted()


def test_content_of_partitions_no_longer_owned_is_not_committed(
    worker: Worker,
) -> None:
    committer = _committer(worker)
    _queue(worker, TP, 10, "a")
    _queue(worker, OTHER, 3, "gone")
    del worker._buffers[OTHER]  # revoked meanwhile: its new owner re-reads

    assert worker._commit() is True

    assert committer.calls[0]["offsets"] == {TP: 10}
    assert [d.key for d in committer.calls[0]["letters"]] == [b"a"]


def test_new_batches_wait_while_a_transaction_stalls_or_its_retry_is_due(
    worker: Worker,
) -> None:
    """A transaction running past COMMIT_SLOW_S, or an aborted one whose content
    waits, holds back new batches: an outage of Kafka must not pile up
    delivered but uncommitted batches."""
    committer = _committer(worker)
    committer.errors.append(TransactionAbortedError("broker went away"))
    _start_held(worker, TP, 10, "a")
    started = worker._txn_started_at

    assert not worker._commit_stalled(started + COMMIT_SLOW_S / 2)
    assert worker._commit_stalled(started + COMMIT_SLOW_S + 0.1)

    committer.release.set()
    _collect(worker)  # aborted: content queued again
    assert worker._commit_stalled(worker._clock())

    worker._retry_commit_at = 0.0
    worker._commit_in_background()
    _collect(worker)  # committed this time
    assert not worker._commit_stalled(worker._clock())
