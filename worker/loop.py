"""The consumer loop: poll, dedupe, batch, send, settle, commit, shut down.

One thread owns the consumer and decides everything. Batches are sent from a
small thread pool; their outcomes come back to the owning thread, which queues
their dead letters, state updates and offsets and sends each partition's next
batch. The queue is committed in one Kafka transaction at a time on a thread of
its own (see ``committer``), so the loop keeps reading while the broker
commits, and what settles meanwhile goes into the next transaction. At most one
batch per partition is in flight, so records of one partition reach the API in
offset order.

The loop reads one of three sources:

- the consumer group on the person and event topics (``run``), committing its
  offsets, optionally until the end offsets seen at start (``--until-caught-up``);
- fixed offset ranges of input partitions (``replay``), without a group commit;
- ranges of the dead-letter topic (``dlq redrive``), each record re-processed
  under its original coordinates.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from worker.batcher import Batch, BatchLimits, Item, PartitionBuffer
from worker.committer import (
    TRANSACTION_TIMEOUT_S,
    Committer,
    DeadLetter,
    TransactionAbortedError,
    TransactionError,
)
from worker.delivery import AbandonedError, Deliverer, Outcome
from worker.errors import ConfigError, TransientError, WorkerError
from worker.mapping import serialize
from worker.metrics import Metrics, consumer_lags
from worker.pipeline import build_routes, to_item
from worker.ratelimit import RateLimiter
from worker.rejects import Reject, dead_letter_records
from worker.settings import Settings, kafka_client_config
from worker.state import EventDedupe, PartitionState, PersonDedupe, StateUpdate
from worker.statestore import ensure_state_topic, restore, watermarks
from worker.track import TrackClient

log = structlog.get_logger(__name__)

# How long one poll of the consumer may wait for records: librdkafka returns
# only once CONSUME_BATCH records are there or the wait is over, so under light
# load each turn of the loop lasts the whole wait. Idle, the loop waits long;
# with a batch in flight or a transaction running, briefly, so an outcome is
# acted on (the partition's next batch sent) within milliseconds; with a batch
# lingering, until its linger ends.
POLL_TIMEOUT_S = 0.05
BUSY_POLL_TIMEOUT_S = 0.005
# Messages taken from librdkafka per call: large enough to amortise the call,
# small enough that lingering batches are looked at every few milliseconds.
CONSUME_BATCH = 1000
METADATA_TIMEOUT_S = 10.0
EXPIRY_INTERVAL_S = 60.0
REPORT_INTERVAL_S = 1.0
# Waits before re-reading a partition held by a passing fault, doubling to a cap.
HOLD_FIRST_S = 1.0
# An aborted transaction is committed again on the next turns; this many aborts
# in a row (about five minutes of a broker refusing) stop the worker instead.
MAX_ABORTS_IN_A_ROW = 30
# A transaction takes about 0.1 s on a healthy broker; one running longer than
# this holds back new batches until it ends (see _commit_stalled).
COMMIT_SLOW_S = 2.0
HOLD_MAX_S = 30.0
# A worker whose partitions were lost (or that has just subscribed) waits for
# the group to assign it partitions again, possibly none: the group calls
# ``_on_assign`` at the end of every rebalance. While it waits it says so this
# often, and it stops (owning nothing, so losing nothing) once the wait is
# longer than two rebalances can take (max.poll.interval.ms each), a session
# timeout and this margin; its restart joins the group afresh.
REJOIN_LOG_INTERVAL_S = 60.0
REJOIN_MARGIN_S = 60.0

TP = tuple[str, int]


@dataclass(slots=True)
class Counters:
    consumed: int = 0
    delivered: int = 0
    skipped: int = 0
    rejected: int = 0
    batches: int = 0
    requests: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "delivered": self.delivered,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "batches": self.batches,
            "requests": self.requests,
            "rejected_by_reason": dict(self.by_reason),
        }


@dataclass(frozen=True, slots=True)
class _Content:
    """What one transaction writes: dead letters by input partition (offset
    order), state updates by state partition, and the input offsets."""

    letters: dict[TP, list[DeadLetter]]
    updates: list[tuple[int, StateUpdate]]
    offsets: dict[TP, int]


@dataclass(frozen=True, slots=True)
class Ranges:
    """Offset ranges to read instead of the group: ``[start, end)`` per partition.

    ``wrap`` turns a consumed message into the record to process (dead-letter
    redrive restores the original coordinates); ``keep`` filters records.
    """

    offsets: dict[TP, tuple[int, int]]
    wrap: Callable[[Any], Any | None] | None = None
    keep: Callable[[Any], bool] | None = None


class Worker:
    """Delivers person and event records to the Track API until stopped."""

    def __init__(
        self,
        settings: Settings,
        *,
        until_caught_up: bool = False,
        ranges: Ranges | None = None,
        ignore_state: bool = False,
        progress: Callable[[int], None] | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        site_id, api_key = settings.require_credentials()
        self.settings = settings
        self.until_caught_up = until_caught_up or ranges is not None
        self.counters = Counters()
        self._ranges = ranges
        self._ignore_state = ignore_state
        self._progress = progress
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._wall_clock = wall_clock
        self._stop_requested = threading.Event()
        self._abandon = threading.Event()
        self._routes = build_routes(settings)
        self._person_dedupe = PersonDedupe(settings.state.person_dedupe)
        self._event_dedupe = EventDedupe(settings.state.event_dedupe)
        self._limits = BatchLimits(
            settings.batch.max_entries,
            settings.batch.max_request_bytes,
            settings.batch.linger_ms / 1000,
        )
        track = settings.track
        self._client = TrackClient(
            track.url,
            site_id,
            api_key,
            connect_timeout_s=track.connect_timeout_s,
            read_timeout_s=track.read_timeout_s,
            pool_size=track.max_concurrency,
        )
        self._limiter = RateLimiter(track.rate_limit_rps)
        self._deliverer = Deliverer(
            self._client,
            self._abandon,
            max_wait_s=track.retry_max_wait_s,
            retry_after_max_s=track.retry_after_max_s,
            limiter=self._limiter,
            metrics=self.metrics,
        )
        self._input_partitions = 0
        self._deadline: float | None = None
        self.buffered_bytes = 0
        self._pool = ThreadPoolExecutor(
            track.max_concurrency, thread_name_prefix="cio-send"
        )
        self._buffers: dict[TP, PartitionBuffer] = {}
        self._in_flight: dict[Future[Outcome], Batch] = {}
        self._paused: set[TP] = set()
        self._held: dict[TP, float] = {}
        self._hold_count: dict[TP, int] = {}
        self._revoking: set[TP] = set()
        self._eof: dict[TP, int] = {}
        self._end: dict[TP, int] = {}
        self._states: dict[int, PartitionState] = {}
        self._state_users: dict[int, set[TP]] = {}
        self._pending_state: list[tuple[int, StateUpdate]] = []
        self._unsettled_letters: dict[TP, list[DeadLetter]] = {}
        self._unsettled_offsets: dict[TP, int] = {}
        self._aborted_in_a_row = 0
        self._retry_commit_at = 0.0
        # The transaction being committed on its own thread, and its content.
        self._txn: Future[int] | None = None
        self._txn_content: _Content | None = None
        self._txn_started_at = 0.0
        self._txn_pool = ThreadPoolExecutor(1, thread_name_prefix="cio-commit")
        self._next_expiry = 0.0
        self._next_report = 0.0
        # Since when the group owes this worker an assignment; None once given.
        self._unassigned_since: float | None = None
        self._next_rejoin_log = 0.0
        self._consumer: Consumer | None = None
        self._committer: Committer | None = None

    # -- lifecycle -------------------------------------------------------------

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to stop; safe from a signal handler. The shutdown's
        deadline starts now, so a commit blocked at this moment ends by it too."""
        if self._deadline is None:
            self._deadline = self._clock() + self.settings.track.shutdown_timeout_s
        self._stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def run(self) -> Counters:
        """Run until stopped (or caught up); return what was done."""
        started = self._clock()
        self._connect()
        log.info(
            "worker_started",
            source="ranges" if self._ranges else "group",
            until_caught_up=self.until_caught_up,
            settings=self.settings.redacted(),
        )
        try:
            while not self._stop_requested.is_set():
                self._run_once()
                if self.until_caught_up and self._caught_up():
                    log.info("caught_up")
                    break
        finally:
            self._shutdown()
        log.info(
            "worker_stopped",
            seconds=round(self._clock() - started, 3),
            **self.counters.as_dict(),
        )
        return self.counters

    def _connect(self) -> None:
        settings = self.settings
        kafka = settings.kafka
        try:
            consumer = Consumer(kafka_client_config(settings, "consumer"))
        except KafkaException as exc:
            raise ConfigError(
                f"Kafka settings refused: {exc.args[0].str()}; check "
                "CIO_KAFKA__PROPERTIES"
            ) from exc
        try:
            partitions = self._check_topics(consumer)
            admin = AdminClient(kafka_client_config(settings, "admin"))
            ensure_state_topic(admin, settings.state_topic, partitions)
        except Exception:
            consumer.close()
            raise
        producer_config = kafka_client_config(
            settings, "producer", self._transactional_id()
        )
        self._committer = Committer(
            lambda: Producer(producer_config),
            kafka.dead_letter_topic,
            settings.state_topic,
            deadline=self._commit_deadline,
            clock=self._clock,
        )
        self._committer.start()
        self._consumer = consumer
        if self._ranges is None:
            consumer.subscribe(
                [kafka.person_topic, kafka.event_topic],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self._await_assignment()
            return
        starts = [
            TopicPartition(t, p, o) for (t, p), (o, _) in self._ranges.offsets.items()
        ]
        self._end = {tp: end for tp, (_, end) in self._ranges.offsets.items()}
        self._on_assign(consumer, starts)
        consumer.assign(starts)

    def _commit_deadline(self) -> float | None:
        """When a commit must stop waiting on the broker: none while running;
        once stopping, the shutdown's deadline plus one last commit's timeout
        (batches in flight may use the whole shutdown_timeout_s)."""
        if self._deadline is None:
            return None
        return self._deadline + TRANSACTION_TIMEOUT_S

    def _transactional_id(self) -> str:
        """A stable id when the replica has a stable identity, else a unique one.

        With a stable id, a restarted replica's ``init_transactions`` aborts the
        transaction its killed predecessor left open, at once. With a per-process
        id that transaction blocks read_committed readers of the state topic
        until ``transaction_timeout_ms`` ends it.
        """
        state, kafka = self.settings.state, self.settings.kafka
        stable = state.transactional_id or kafka.group_instance_id
        if self._ranges is not None:
            return f"{kafka.group_id}-{socket.gethostname()}-range-{os.getpid()}"
        if stable:
            return f"{kafka.group_id}-{stable}"
        return f"{kafka.group_id}-{socket.gethostname()}-{os.getpid()}"

    def _check_topics(self, consumer: Consumer) -> int:
        """Check every topic exists; return the widest input topic's partitions."""
        kafka = self.settings.kafka
        try:
            metadata = consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        except KafkaException as exc:
            raise ConfigError(
                f"cannot reach Kafka at {kafka.bootstrap_servers}: {exc.args[0]}; "
                "check CIO_KAFKA__BOOTSTRAP_SERVERS and the security properties"
            ) from exc
        wanted = [kafka.person_topic, kafka.event_topic, kafka.dead_letter_topic]
        missing = [t for t in wanted if t not in metadata.topics]
        if missing:
            raise ConfigError(
                f"topics missing on {kafka.bootstrap_servers}: {', '.join(missing)}; "
                "create them or set CIO_KAFKA__PERSON_TOPIC / EVENT_TOPIC / "
                "DEAD_LETTER_TOPIC"
            )
        counts = [
            len(metadata.topics[t].partitions)
            for t in (kafka.person_topic, kafka.event_topic)
        ]
        self._input_partitions = sum(counts)
        return max(counts)

    def _shutdown(self) -> None:
        """Settle what is in flight within the deadline, commit it, close."""
        log.info("worker_stopping", in_flight=len(self._in_flight))
        if self._deadline is None:  # caught up, or failed: no stop was asked
            self._deadline = self._clock() + self.settings.track.shutdown_timeout_s
        deadline = self._deadline
        try:
            while self._in_flight and self._clock() < deadline:
                self._settle_done(wait_s=0.1)
            if self._in_flight:
                log.warning("batches_abandoned", count=len(self._in_flight))
            self._abandon.set()
            self._settle_done(wait_s=0)
            while self._settles_uncommitted() and self._clock() < deadline:
                if not self._commit():
                    time.sleep(min(1.0, max(deadline - self._clock(), 0.0)))
            if self.until_caught_up and self._ranges is None:
                self._commit_drained_positions()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            # A commit still running ends by the deadline (the committer cuts
            # its calls there), before its producer is closed.
            self._txn_pool.shutdown(wait=True)
            if self._consumer is not None:
                self._consumer.close()
            if self._committer is not None:
                self._committer.close()
            self._client.close()

    # -- one turn of the loop ----------------------------------------------------

    def _run_once(self) -> None:
        assert self._consumer is not None
        timeout_s = self._poll_timeout(self._clock())
        messages = self._consumer.consume(CONSUME_BATCH, timeout=timeout_s)
        now = self._clock()
        for message in messages:
            self._handle(message, now)
        self._settle_done(wait_s=0)
        self._commit_in_background()
        self._launch_ready(self._clock())
        self._apply_backpressure()
        self._release_held(self._clock())
        self._expire_events()
        self._report(self._clock())
        self._check_rejoin(self._clock())
        if self._progress is not None:
            self._progress(self.counters.consumed)

    def _poll_timeout(self, now: float) -> float:
        """How long the next poll may wait without delaying anything due."""
        if self._in_flight or self._txn is not None:
            return BUSY_POLL_TIMEOUT_S
        timeout_s = POLL_TIMEOUT_S
        for buffer in self._buffers.values():
            due = buffer.next_deadline()
            if due is not None:
                timeout_s = min(timeout_s, due - now)
        return max(timeout_s, BUSY_POLL_TIMEOUT_S)

    def _handle(self, message: Any, now: float) -> None:
        error = message.error()
        tp = (message.topic(), message.partition())
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._eof[tp] = message.offset()
                return
            if error.fatal():
                raise WorkerError(f"fatal Kafka error: {error.str()}")
            log.warning("kafka_error", code=error.name(), error=error.str())
            return
        buffer = self._buffers.get(tp)
        if buffer is None or tp in self._held:
            return  # revoked meanwhile, or waiting to re-read from a held offset
        offset = message.offset()
        if tp in self._end and offset >= self._end[tp]:
            self._eof[tp] = self._end[tp]  # past the range: this partition is done
            return
        self._eof.pop(tp, None)
        record = message
        if self._ranges is not None:
            if self._ranges.keep is not None and not self._ranges.keep(message):
                return  # filtered out: neither consumed nor committed
            if self._ranges.wrap is not None:
                record = self._ranges.wrap(message)
                if record is None:
                    return  # part of a chunked dead letter not yet complete
        route = self._routes.get(record.topic())
        if route is None:
            self.counters.consumed += 1
            self.metrics.record_consumed(record.topic())
            reject = Reject("decode", "unknown_topic", "not a person or event topic")
            buffer.add(Item(offset, record, reject=reject), now)
            return
        try:
            item = to_item(record, route)
        except TransientError as exc:
            self._hold(tp, offset, now, exc)
            return
        self.counters.consumed += 1
        self.metrics.record_consumed(record.topic())
        item.offset = offset
        self._dedupe(item, record.partition())
        buffer.add(item, now)

    def _hold(self, tp: TP, offset: int, now: float, exc: Exception) -> None:
        """Stop a partition at a record that hit a passing fault (the schema
        registry is down): pause it and re-read from that offset later, so
        nothing is skipped and nothing is dead-lettered for the outage."""
        assert self._consumer is not None
        wait_s = min(HOLD_MAX_S, HOLD_FIRST_S * 2 ** self._hold_count.get(tp, 0))
        self._hold_count[tp] = self._hold_count.get(tp, 0) + 1
        self._held[tp] = now + wait_s
        partition = TopicPartition(tp[0], tp[1], offset)
        self._consumer.pause([partition])
        self._consumer.seek(partition)
        log.warning(
            "partition_held", topic=tp[0], partition=tp[1], offset=offset,
            wait_s=wait_s, error=str(exc),
        )  # fmt: skip

    def _release_held(self, now: float) -> None:
        assert self._consumer is not None
        for tp, until in list(self._held.items()):
            if now >= until:
                del self._held[tp]
                if tp not in self._paused:
                    self._consumer.resume([TopicPartition(*tp)])

    def _dedupe(self, item: Item, state_partition: int) -> None:
        """Decide from the state whether the item's entry must be sent."""
        # The entry's dict, carried from the mapping (parsed again only for an
        # item built without it); dropped here, so buffered items hold bytes.
        entry, item.data = item.data, None
        if item.entry is None:
            return
        state = self._states.get(state_partition)
        if state is None:
            return
        item.state_partition = state_partition
        if entry is None:
            entry = json.loads(item.entry)
        action = entry.get("action")
        if action == "identify" and "identifiers" in entry:
            decision = state.decide_person(
                entry["identifiers"], entry.get("attributes", {}), self._person_dedupe
            )
            if decision.skip and not self._ignore_state:
                item.entry, item.skipped = None, True
                return
            if decision.attributes is not entry.get("attributes"):
                entry["attributes"] = decision.attributes
                item.entry = serialize(entry)
            item.state_update = decision.update
        elif action in ("delete", "suppress") and "identifiers" in entry:
            item.state_update = state.forget_person(entry["identifiers"])
        elif action == "event" and entry.get("id"):
            now_s = int(self._wall_clock())
            skip, update = state.decide_event(entry["id"], self._event_dedupe, now_s)
            if skip and not self._ignore_state:
                item.entry, item.skipped = None, True
                return
            item.state_update = update

    def _launch_ready(self, now: float) -> None:
        if self._stop_requested.is_set():
            return  # shutting down: settle what is in flight, start nothing new
        if self._commit_stalled(now):
            return
        for tp, buffer in self._buffers.items():
            if tp in self._revoking:
                continue
            buffer.seal_if_due(now, force=tp in self._eof and self.until_caught_up)
            batch = buffer.take_next()
            if batch is not None:
                self._launch(batch)

    def _commit_stalled(self, now: float) -> bool:
        """True while the transaction running has taken longer than a healthy
        one ever does, or the last one failed and its content waits to be
        committed again (the broker is away, say). Nothing new is sent then:
        an outage of Kafka must not pile up delivered but uncommitted batches,
        each entry of which is sent again if the partitions are lost meanwhile.
        """
        if self._txn is not None and now - self._txn_started_at > COMMIT_SLOW_S:
            return True
        return bool(self._aborted_in_a_row) and self._settles_uncommitted()

    def _settles_uncommitted(self) -> bool:
        """Settled offsets or dead letters wait, or a transaction is running."""
        return bool(self._unsettled_offsets or self._unsettled_letters or self._txn)

    def _launch(self, batch: Batch) -> None:
        entries = batch.entries()
        future: Future[Outcome] = Future()
        if entries:
            future = self._pool.submit(
                self._deliverer.deliver,
                entries,
                topic=batch.topic,
                partition=batch.partition,
                first_offset=batch.first_offset,
            )
        else:
            future.set_result(Outcome())
        self._in_flight[future] = batch

    # -- settling: one transaction per step ----------------------------------------

    def _settle_done(self, wait_s: float) -> None:
        if wait_s and self._in_flight:
            wait(list(self._in_flight), timeout=wait_s, return_when=FIRST_COMPLETED)
        settled: list[tuple[Batch, Outcome]] = []
        for future in [f for f in self._in_flight if f.done()]:
            batch = self._in_flight.pop(future)
            try:
                outcome = future.result()
            except AbandonedError:
                continue  # not settled: re-sent after restart, never committed
            if (batch.topic, batch.partition) not in self._buffers:
                continue  # revoked meanwhile: the new owner re-sends it
            settled.append((batch, outcome))
        if settled:
            self._settle(settled)

    def _settle(self, settled: list[tuple[Batch, Outcome]]) -> None:
        """Queue the dead letters, state updates and offsets of settled batches
        for the next transaction, and send each partition's next batch.

        The batches count as done once their outcome is known: the next batch
        of the partition goes out at once, while the transaction that commits
        this one runs on its own thread. If that transaction is aborted (a
        rebalance, a broker restart), its content is queued again and goes into
        a later one; a crash before the commit re-sends the batches from the
        last committed offsets, as it always could.
        """
        for batch, outcome in settled:
            tp = (batch.topic, batch.partition)
            letters = self._dead_letters(batch, outcome)
            self._unsettled_letters.setdefault(tp, []).extend(letters)
            self._collect_state(batch, outcome)
            self._unsettled_offsets[tp] = batch.last_offset + 1
        for batch, outcome in settled:
            buffer = self._buffers.get((batch.topic, batch.partition))
            if buffer is not None:
                buffer.complete(batch)
            self._count_and_log(batch, outcome)
        self._launch_ready(self._clock())
        self._commit_in_background()

    def _has_uncommitted(self) -> bool:
        return bool(
            self._unsettled_offsets or self._unsettled_letters or self._pending_state
        )

    def _commit_in_background(self) -> None:
        """Collect the finished transaction, if any; then, unless one is still
        running or an aborted one is waiting out its pause, start the next with
        everything queued meanwhile (so commits coalesce under load)."""
        if self._txn is not None:
            if not self._txn.done():
                return
            self._finish_transaction()
        if (
            self._unsettled_offsets or self._unsettled_letters
        ) and self._clock() >= self._retry_commit_at:
            self._start_transaction()

    def _commit(self, offsets: dict[TP, int] | None = None) -> bool:
        """Commit everything queued, waiting for it (rebalances, shutdown);
        False if the transaction was aborted and its content stays queued.
        Content of partitions no longer owned is dropped: the new owner reads
        those records again."""
        if self._txn is not None:
            wait([self._txn])
            self._finish_transaction()
        for tp, offset in (offsets or {}).items():
            self._unsettled_offsets[tp] = max(
                offset, self._unsettled_offsets.get(tp, 0)
            )
        if not self._has_uncommitted():
            return True
        self._start_transaction()
        assert self._txn is not None
        wait([self._txn])
        return self._finish_transaction()

    def _start_transaction(self) -> None:
        """Take everything queued out of the queues and commit it on the commit
        thread; ``_finish_transaction`` puts it back if the commit fails."""
        assert self._committer is not None
        assert self._consumer is not None
        grouped = self._ranges is None
        for tp in [tp for tp in self._unsettled_offsets if tp not in self._buffers]:
            self._unsettled_offsets.pop(tp)
        for tp in [tp for tp in self._unsettled_letters if tp not in self._buffers]:
            self._unsettled_letters.pop(tp)
        content = _Content(
            self._unsettled_letters,
            [u for u in self._pending_state if u[0] in self._states],
            self._unsettled_offsets,
        )
        self._unsettled_letters, self._unsettled_offsets = {}, {}
        self._pending_state = []
        letters = [d for tp in sorted(content.letters) for d in content.letters[tp]]
        metadata = self._consumer.consumer_group_metadata() if grouped else None
        self._txn_content = content
        self._txn_started_at = self._clock()
        self._txn = self._txn_pool.submit(
            self._committer.commit,
            letters,
            content.updates,
            content.offsets if grouped else {},
            metadata,
        )

    def _finish_transaction(self) -> bool:
        """Account for the finished transaction; False if it was aborted, its
        content then queued again ahead of what came meanwhile. Raises
        TransactionError when the producer cannot go on."""
        assert self._txn is not None
        assert self._txn_content is not None
        future, content = self._txn, self._txn_content
        self._txn, self._txn_content = None, None
        try:
            transactions = future.result()
        except TransactionAbortedError as exc:
            self._requeue(content)
            self._aborted_in_a_row += 1
            if self._aborted_in_a_row > MAX_ABORTS_IN_A_ROW:
                raise TransactionError(
                    f"{exc}; gave up after {MAX_ABORTS_IN_A_ROW} tries"
                ) from exc
            wait_s = min(2.0 ** (self._aborted_in_a_row - 1), 10.0)
            self._retry_commit_at = self._clock() + wait_s
            log.warning(
                "transaction_aborted",
                attempt=self._aborted_in_a_row,
                wait_s=wait_s,
                error=str(exc),
            )
            return False
        self._aborted_in_a_row = 0
        self._retry_commit_at = 0.0
        self.metrics.record_transaction(transactions)
        return True

    def _requeue(self, content: _Content) -> None:
        """Put an aborted transaction's content back, before anything queued
        since (older dead letters and state updates first; offsets only move
        forward)."""
        for tp, offset in content.offsets.items():
            self._unsettled_offsets[tp] = max(
                offset, self._unsettled_offsets.get(tp, 0)
            )
        for tp, letters in content.letters.items():
            self._unsettled_letters[tp] = letters + self._unsettled_letters.get(tp, [])
        self._pending_state = [
            u for u in content.updates if u[0] in self._states
        ] + self._pending_state

    def _dead_letters(self, batch: Batch, outcome: Outcome) -> list[DeadLetter]:
        letters = []
        for item, reject in _rejects_of(batch, outcome):
            message = item.message
            attempts = getattr(message, "attempts", 0)  # a redriven record's
            if attempts > reject.attempts:
                reject = replace(reject, attempts=attempts)
            # One dead letter, or the chunks of one too large for the topic.
            letters += [
                DeadLetter(*record) for record in dead_letter_records(message, reject)
            ]
            self.counters.rejected += 1
            self.metrics.record_dead_lettered(
                message.topic(), reject.stage, reject.reason
            )
            self.counters.by_reason[reject.reason] = (
                self.counters.by_reason.get(reject.reason, 0) + 1
            )
            log.error(
                "record_dead_lettered",
                topic=message.topic(),
                partition=message.partition(),
                offset=message.offset(),
                stage=reject.stage,
                reason=reject.reason,
                field=reject.field,
            )
        return letters

    def _collect_state(self, batch: Batch, outcome: Outcome) -> None:
        """Queue the state updates of accepted entries; revert refused ones."""
        refused = {
            id(item) for index, item in enumerate(batch.entry_items())
            if index in outcome.rejected
        }  # fmt: skip
        for item in batch.items:
            update = item.state_update
            if update is None:
                continue
            state = self._states.get(item.state_partition)
            if id(item) in refused:
                if state is not None:
                    state.revert(update)
            else:
                self._pending_state.append((item.state_partition, update))

    def _count_and_log(self, batch: Batch, outcome: Outcome) -> None:
        entries = batch.entry_count
        api_rejected = len(outcome.rejected)
        skipped = sum(1 for item in batch.items if item.skipped)
        self.counters.delivered += entries - api_rejected
        self.counters.skipped += skipped
        self.metrics.record_batch(batch.topic, entries - api_rejected, skipped)
        self.counters.batches += 1
        self.counters.requests += outcome.requests
        if entries:
            log.info(
                "batch_sent",
                topic=batch.topic,
                partition=batch.partition,
                first_offset=batch.first_offset,
                last_offset=batch.last_offset,
                entries=entries,
                bytes=batch.body_bytes,
                status=outcome.last_status,
                requests=outcome.requests,
                attempts=outcome.attempts,
                refused=api_rejected,
                latency_ms=round(outcome.latency_s * 1000, 1),
            )

    def _commit_drained_positions(self) -> None:
        """Commit the end offset of every drained partition (run-until-caught-up),
        so offsets also cover transaction markers after the last record."""
        offsets = {
            tp: self._eof[tp]
            for tp, buffer in self._buffers.items()
            if tp in self._eof and buffer.is_idle()
        }
        self._commit(offsets)

    def _expire_events(self) -> None:
        now = self._clock()
        if now < self._next_expiry:
            return
        self._next_expiry = now + EXPIRY_INTERVAL_S
        retention_s = int(self.settings.state.event_retention_hours * 3600)
        now_s = int(self._wall_clock())
        for partition, state in self._states.items():
            for tombstone in state.expire_events(now_s, retention_s):
                self._pending_state.append((partition, tombstone))

    # -- flow control and rebalances ---------------------------------------------

    def _apply_backpressure(self) -> None:
        """Pause partitions whose buffers are full (or all, when the total is), so
        memory stays bounded while the loop keeps polling; resume at half."""
        assert self._consumer is not None
        batch = self.settings.batch
        cap = batch.max_buffered_bytes_per_partition
        total = sum(b.buffered_bytes for b in self._buffers.values())
        over_total = total > batch.max_buffered_bytes
        under_total = total <= batch.max_buffered_bytes // 2
        for tp, buffer in self._buffers.items():
            if tp not in self._paused and (buffer.buffered_bytes > cap or over_total):
                self._consumer.pause([TopicPartition(*tp)])
                self._paused.add(tp)
            elif (
                tp in self._paused and buffer.buffered_bytes <= cap // 2 and under_total
            ):
                self._paused.discard(tp)
                if tp not in self._held:
                    self._consumer.resume([TopicPartition(*tp)])
        self.buffered_bytes = total

    def _caught_up(self) -> bool:
        if not self._buffers or self._in_flight:
            return False
        return all(
            buffer.is_idle() and self._eof.get(tp, -1) >= self._end.get(tp, 0)
            for tp, buffer in self._buffers.items()
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._unassigned_since = None
        # A partition lost while paused (say, during a broker outage) can come
        # back still paused in librdkafka; this worker starts it afresh.
        consumer.resume(partitions)
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._buffers[key] = PartitionBuffer(tp.topic, tp.partition, self._limits)
            if self.until_caught_up and key not in self._end:
                _, high = watermarks(consumer, tp)
                self._end[key] = high
        self._load_state(partitions)
        self._update_share()
        self.metrics.set_assigned(len(self._buffers))
        log.info(
            "partitions_assigned",
            partitions=_names(partitions),
            rate_limit_rps=round(self._limiter.target, 2),
        )

    def _load_state(self, partitions: list[TopicPartition]) -> None:
        """Restore the state partitions the new input partitions need."""
        if self._ranges is not None and self._ranges.wrap is not None:
            needed = {-1}  # redrive: records come from any source partition
        else:
            needed = {tp.partition for tp in partitions}
        if -1 in needed:
            needed = set(range(self._state_partition_count()))
        for tp in partitions:
            for p in needed:
                self._state_users.setdefault(p, set()).add((tp.topic, tp.partition))
        missing = sorted(p for p in needed if p not in self._states)
        if missing:
            config = kafka_client_config(self.settings, "admin")
            self.metrics.restore_started(len(missing))
            restored = restore(
                config,
                self.settings.state_topic,
                missing,
                progress=self.metrics.restore_progress,
            )
            self._states.update(restored)
            self.metrics.restore_finished(sum(len(s) for s in self._states.values()))

    def _state_partition_count(self) -> int:
        assert self._consumer is not None
        topic = self.settings.state_topic
        metadata = self._consumer.list_topics(topic, timeout=METADATA_TIMEOUT_S)
        return len(metadata.topics[topic].partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Settle the revoked partitions' in-flight batches, commit, forget them."""
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._revoking |= revoked
        deadline = self._deadline or (
            self._clock() + self.settings.track.shutdown_timeout_s
        )
        while self._clock() < deadline and any(
            (b.topic, b.partition) in revoked for b in self._in_flight.values()
        ):
            self._settle_done(wait_s=0.05)
        self._commit()  # waits for the one running, then commits the rest
        self._forget(revoked)
        self._revoking -= revoked
        log.info("partitions_revoked", partitions=_names(partitions))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Drop lost partitions without committing: another member owns them."""
        lost = {(tp.topic, tp.partition) for tp in partitions}
        for future, batch in list(self._in_flight.items()):
            if (batch.topic, batch.partition) in lost:
                del self._in_flight[future]
        self._forget(lost)
        self._await_assignment()
        log.warning("partitions_lost", partitions=_names(partitions))

    def _await_assignment(self) -> None:
        """Start waiting for the group's next assignment (see _check_rejoin)."""
        if self._unassigned_since is None:
            self._unassigned_since = self._clock()
            self._next_rejoin_log = self._unassigned_since + REJOIN_LOG_INTERVAL_S

    def _rejoin_limit_s(self) -> float:
        kafka = self.settings.kafka
        rebalance_s = kafka.max_poll_interval_ms / 1000
        return 2 * rebalance_s + kafka.session_timeout_ms / 1000 + REJOIN_MARGIN_S

    def _check_rejoin(self, now: float) -> None:
        """Warn every REJOIN_LOG_INTERVAL_S while the group has not assigned this
        worker partitions since it lost its own (or subscribed); past the limit,
        stop. A group that never answers would otherwise leave the worker idle
        for good, alive for the liveness probe and with no log line."""
        since = self._unassigned_since
        if since is None or now < self._next_rejoin_log:
            return
        assert self._consumer is not None
        waited_s = now - since
        limit_s = self._rejoin_limit_s()
        if waited_s >= limit_s:
            raise WorkerError(
                f"the consumer group has assigned this worker no partitions for "
                f"{waited_s:.0f} s since it lost its own or joined (limit "
                f"{limit_s:.0f} s: two rebalances at max_poll_interval_ms plus "
                "session_timeout_ms); stopping, so that a restart joins afresh"
            )
        self._next_rejoin_log = min(now + REJOIN_LOG_INTERVAL_S, since + limit_s)
        log.warning(
            "group_rejoin_slow",
            seconds=round(waited_s),
            client_assignment=len(self._consumer.assignment()),
            stops_in_s=round(limit_s - waited_s),
        )

    def _revert_unsettled(self, buffer: PartitionBuffer) -> None:
        for item in reversed(buffer.unsettled_items()):
            state = self._states.get(item.state_partition)
            if item.state_update is not None and state is not None:
                state.revert(item.state_update)

    def _report(self, now: float) -> None:
        """Heartbeat every turn; gauges (lag, buffers, rate) every second."""
        self.metrics.heartbeat()
        if now < self._next_report:
            return
        self._next_report = now + REPORT_INTERVAL_S
        assert self._consumer is not None
        self.metrics.set_buffered_bytes(self.buffered_bytes)
        self.metrics.set_rate_limit(self._limiter.rate)
        self.metrics.set_credentials_paused(
            self._deliverer.credentials_failing.is_set()
        )
        if self._buffers:
            self.metrics.set_lags(
                consumer_lags(self._consumer, self._buffers, self._eof)
            )

    def _update_share(self) -> None:
        """Take this process's share of the workspace's request rate."""
        if self._ranges is None:
            self._limiter.set_share(len(self._buffers), self._input_partitions)

    def _forget(self, partitions: set[TP]) -> None:
        """Drop partitions this worker no longer owns, undoing the state decisions
        of their unsettled records: those records were not delivered by this
        worker, and another owner (or this one, later) must still send them."""
        for tp in partitions:
            buffer = self._buffers.pop(tp, None)
            if buffer is not None:
                self._revert_unsettled(buffer)
            self._paused.discard(tp)
            self._eof.pop(tp, None)
            self._end.pop(tp, None)
            # Delivered but not committed: whoever owns the partition next (this
            # worker too, if it comes back) reads those records again.
            self._unsettled_offsets.pop(tp, None)
            self._unsettled_letters.pop(tp, None)
        for p, users in list(self._state_users.items()):
            users -= partitions
            if not users:
                del self._state_users[p]
                self._states.pop(p, None)
                self._pending_state = [u for u in self._pending_state if u[0] != p]
        for tp in partitions:
            self._held.pop(tp, None)
        self._update_share()
        self.metrics.forget_partitions(partitions)
        self.metrics.set_assigned(len(self._buffers))


def _rejects_of(batch: Batch, outcome: Outcome) -> list[tuple[Item, Reject]]:
    """Every rejected item of a batch, in offset order, with its reason."""
    api_rejected = {
        id(item): outcome.rejected[index]
        for index, item in enumerate(batch.entry_items())
        if index in outcome.rejected
    }
    rejects = []
    for item in batch.items:
        if item.reject is not None:
            rejects.append((item, item.reject))
        elif id(item) in api_rejected:
            refusal = api_rejected[id(item)]
            reject = Reject(
                "api", refusal.reason, refusal.message, refusal.field, outcome.attempts
            )
            rejects.append((item, reject))
    return rejects


def _names(partitions: list[TopicPartition]) -> list[str]:
    return [f"{tp.topic}[{tp.partition}]" for tp in partitions]
