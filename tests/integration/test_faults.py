"""Faults and load: the worker holds through them without losing a record.

Each scenario writes people and events with known ids, runs real worker
processes against the real broker and the simulator (which injects the fault),
and accounts for every record: delivered, skipped as a duplicate, or
dead-lettered. None may be lost and none dead-lettered because of an outage.
Each prints one JSON line: produced, delivered, dead-lettered, lost, sent-twice
counts and the longest pause between two accepted entries.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from ulid import ULID

from tests.integration.conftest import API_KEY, ROOT, SITE_ID
from tests.integration.kafka_tools import committed_offsets, end_offsets, read_all
from worker.avro import encode, load_schema
from worker.committer import TRANSACTION_TIMEOUT_S
from worker.sandbox.broker import LocalBroker, default_home
from worker.sandbox.sample import create_topics
from worker.sandbox.simulator import Fault, TrackSimulator
from worker.settings import TrackSettings

pytestmark = pytest.mark.integration

# Worker logs of the fault runs, kept for a person to read after a failure.
LOG_DIR = ROOT / ".cache" / "test-logs" / "faults"
LOGS: dict[int, Path] = {}
# The broker-restart scenarios run a broker of their own on this port.
RESTART_BROKER_PORT = 19392
# SIGTERM to exit: the default shutdown_timeout_s, one last commit's timeout,
# then closing the clients.
SHUTDOWN_BOUND_S = TrackSettings().shutdown_timeout_s + TRANSACTION_TIMEOUT_S + 10

PERSON_SCHEMA = load_schema(ROOT / "schemas" / "person.avsc")
EVENT_SCHEMA = load_schema(ROOT / "schemas" / "person_event.avsc")


@dataclass
class Run:
    """One scenario's topics, data and worker environment."""

    bootstrap: str
    env: dict[str, str]
    person_topic: str
    event_topic: str
    dead_letter_topic: str
    people: int
    event_ids: set[str]
    started: float = 0.0

    def start(self, *args: str, **extra: str) -> subprocess.Popen[str]:
        """Start a worker whose log goes to a file beside the test's results."""
        self.started = self.started or time.time()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"{self.env['CIO_KAFKA__GROUP_ID']}-{time.time_ns()}.log"
        with log_path.open("w") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "worker", "run", *args],
                env={**self.env, **extra},
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                text=True,
            )
        LOGS[worker.pid] = log_path
        return worker


def _prepare(
    bootstrap: str,
    simulator: TrackSimulator,
    *,
    people: int = 600,
    events: int = 1400,
    partitions: int = 3,
    **settings: str,
) -> Run:
    run_id = uuid.uuid4().hex[:10]
    names = [f"f-{run_id}.persons", f"f-{run_id}.events", f"f-{run_id}.dead-letters"]
    create_topics(bootstrap, {names[0]: partitions, names[1]: partitions, names[2]: 1})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for i in range(people):
        email = f"u{i}@example.com"
        value = encode(PERSON_SCHEMA, {"person_email": email, "attributes": {"n": i}})
        producer.produce(names[0], key=email.encode(), value=value)
    ids = set()
    for i in range(events):
        event_id = str(ULID.from_timestamp(1_760_000_000 + i))
        ids.add(event_id)
        record = {
            "person_email": f"u{i % people}@example.com",
            "event_name": "clicked",
            "event_id": event_id,
            "timestamp": 1_760_000_000 + i,
        }
        producer.produce(
            names[1], key=event_id.encode(), value=encode(EVENT_SCHEMA, record)
        )
        producer.poll(0)
    assert producer.flush(60) == 0
    env = {
        **os.environ,
        "CIO_SITE_ID": SITE_ID,
        "CIO_API_KEY": API_KEY,
        "CIO_TRACK__BASE_URL": simulator.url,
        "CIO_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "CIO_KAFKA__GROUP_ID": f"g-{run_id}",
        "CIO_KAFKA__PERSON_TOPIC": names[0],
        "CIO_KAFKA__EVENT_TOPIC": names[1],
        "CIO_KAFKA__DEAD_LETTER_TOPIC": names[2],
        "CIO_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "CIO_BATCH__MAX_ENTRIES": "100",
        "CIO_BATCH__LINGER_MS": "50",
        "CIO_TRACK__RETRY_MAX_WAIT_S": "2",
        "CIO_LOG__FORMAT": "json",
        "CIO_METRICS__HOST": "127.0.0.1",
        "CIO_METRICS__PORT": "0",
        **settings,
    }
    return Run(bootstrap, env, *names, people, ids)


def _wait_all_delivered(run: Run, simulator: TrackSimulator, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshot = simulator.snapshot()
        ids = {e["id"] for e in snapshot["events"]}
        if ids >= run.event_ids and len(snapshot["people"]) >= run.people:
            return
        time.sleep(0.2)


def _wait_committed(run: Run, timeout_s: float) -> None:
    """Wait until the group's committed offsets reach the end of both input
    topics: every record is settled, not only accepted by the API."""
    group = run.env["CIO_KAFKA__GROUP_ID"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(
            committed_offsets(run.bootstrap, group, topic)
            == end_offsets(run.bootstrap, topic)
            for topic in (run.person_topic, run.event_topic)
        ):
            return
        time.sleep(0.5)
    pytest.fail(f"offsets not committed to the end in {timeout_s} s")


def _account(run: Run, simulator: TrackSimulator, name: str) -> dict[str, Any]:
    """Every produced record's fate, and the longest pause in acceptance."""
    snapshot = simulator.snapshot()
    events = snapshot["events"]
    ids = [e["id"] for e in events]
    received = snapshot["received_event_ids"]
    accepted_at = sorted([run.started, *(e["accepted_at"] for e in events)])
    gaps = [b - a for a, b in itertools.pairwise(accepted_at)]
    dead = read_all(run.bootstrap, run.dead_letter_topic)
    result = {
        "scenario": name,
        "produced": run.people + len(run.event_ids),
        "delivered_events": len(set(ids) & run.event_ids),
        "delivered_people": len(snapshot["people"]),
        "dead_lettered": len(dead),
        "lost": len(run.event_ids - set(ids))
        + max(run.people - len(snapshot["people"]), 0),
        "events_recorded_twice": len(ids) - len(set(ids)),
        "events_sent_twice": sum(1 for n in received.values() if n > 1),
        "identify_sent_twice": sum(n - 1 for n in snapshot["identify_counts"].values()),
        "longest_pause_s": round(max(gaps, default=0.0), 2),
        "requests": snapshot["stats"]["requests"],
        "responses": snapshot["stats"]["responses"],
    }
    print(json.dumps(result))
    return result


def _assert_nothing_lost(result: dict[str, Any]) -> None:
    assert result["lost"] == 0
    assert result["dead_lettered"] == 0
    assert result["events_recorded_twice"] == 0


def _finish(worker: subprocess.Popen[str], timeout_s: float) -> str:
    """Wait for a worker to exit 0; return its log."""
    try:
        worker.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        pytest.fail(f"worker did not finish in {timeout_s} s; log: {LOGS[worker.pid]}")
    log_text = LOGS[worker.pid].read_text()
    assert worker.returncode == 0, log_text[-3000:]
    return log_text


@pytest.mark.parametrize(
    ("name", "faults"),
    [
        (
            "5xx_bursts",
            [Fault(503, count=5), Fault(200, count=3), Fault(500, count=4),
             Fault(200, count=2), Fault(502, count=6), Fault(504, count=3)],
        ),
        ("429_storm_retry_after", [Fault(429, count=15, retry_after="1")]),
        ("429_storm_no_retry_after", [Fault(429, count=15)]),
        ("latency_spikes", [Fault(200, count=6, delay_s=0.8)]),
        ("read_timeouts", [Fault(200, count=4, delay_s=2.5)]),
    ],
)  # fmt: skip
def test_faults_short_bursts_deliver_everything_and_dead_letter_nothing(
    kafka_bootstrap: str, simulator: TrackSimulator, name: str, faults: list[Fault]
) -> None:
    """Bursts of 5xx and 429 (with and without Retry-After), slow answers and
    read timeouts are retried; every record arrives, none is dead-lettered."""
    run = _prepare(kafka_bootstrap, simulator, CIO_TRACK__READ_TIMEOUT_S="1.5")
    simulator.inject(faults)

    _finish(run.start("--until-caught-up"), timeout_s=120)

    result = _account(run, simulator, name)
    _assert_nothing_lost(result)
    assert result["requests"] > len(faults)


def test_faults_60_second_outage_pauses_and_then_delivers_everything(
    kafka_bootstrap: str, simulator: TrackSimulator
) -> None:
    """A minute of 503s pauses delivery; afterwards everything is delivered and
    nothing was dead-lettered for the outage."""
    run = _prepare(kafka_bootstrap, simulator)
    simulator.inject([Fault(503, duration_s=60)])

    stderr = _finish(run.start("--until-caught-up"), timeout_s=150)

    result = _account(run, simulator, "outage_60s")
    _assert_nothing_lost(result)
    assert result["responses"].get("503", 0) > 5
    assert '"batch_retry"' in stderr


def test_faults_401_for_30_seconds_pauses_without_dead_letters(
    kafka_bootstrap: str, simulator: TrackSimulator
) -> None:
    """Bad credentials pause delivery with an ERROR log; once they work again,
    everything is delivered and nothing was dead-lettered."""
    run = _prepare(kafka_bootstrap, simulator)
    simulator.inject([Fault(401, duration_s=30)])

    stderr = _finish(run.start("--until-caught-up"), timeout_s=120)

    result = _account(run, simulator, "401_for_30s")
    _assert_nothing_lost(result)
    assert '"delivery_paused_credentials"' in stderr
    # The pause is the 30 s of refusals plus at most one credentials probe wait.
    assert result["longest_pause_s"] < 30 + 12


def test_faults_retry_wait_longer_than_poll_interval_causes_no_rebalance(
    kafka_bootstrap: str, simulator: TrackSimulator
) -> None:
    """A 30 s Retry-After with a 10 s max.poll.interval.ms: the loop keeps
    polling while the batch waits, so the group never evicts the worker."""
    run = _prepare(
        kafka_bootstrap, simulator, people=100, events=200,
        CIO_KAFKA__MAX_POLL_INTERVAL_MS="10000",
    )  # fmt: skip
    simulator.inject([Fault(429, count=1, retry_after="30")])
    started = time.monotonic()

    stderr = _finish(run.start("--until-caught-up"), timeout_s=120)

    result = _account(run, simulator, "retry_after_30s_poll_interval_10s")
    _assert_nothing_lost(result)
    assert time.monotonic() - started >= 30
    assert stderr.count('"partitions_assigned"') == 1
    assert '"partitions_revoked"' in stderr  # only the clean one at exit
    assert stderr.count('"partitions_revoked"') == 1
    assert '"partitions_lost"' not in stderr


def test_faults_partition_revoked_mid_batch_is_not_sent_twice_by_new_owner(
    kafka_bootstrap: str, simulator: TrackSimulator
) -> None:
    """A second member joining while slow batches are in flight: the first
    settles what it sent before giving partitions up, so the new owner sends
    nothing again."""
    run = _prepare(kafka_bootstrap, simulator, people=600, events=2400, partitions=6)
    simulator.inject([Fault(200, count=10_000, delay_s=0.15)])
    first = run.start()
    _wait_requests(simulator, 5)
    second = run.start()

    _wait_all_delivered(run, simulator, timeout_s=120)
    for worker in (first, second):
        worker.send_signal(signal.SIGTERM)
    stderrs = [_finish(w, timeout_s=60) for w in (first, second)]

    result = _account(run, simulator, "revoked_mid_batch")
    _assert_nothing_lost(result)
    assert result["events_sent_twice"] == 0
    assert result["identify_sent_twice"] == 0
    assert '"partitions_revoked"' in stderrs[0]


@contextlib.contextmanager
def _own_broker() -> Iterator[LocalBroker]:
    """A broker of the test's own, which it may stop and start."""
    home = (
        default_home()
        if "CIO_SANDBOX_HOME" in os.environ
        else ROOT / ".cache" / "kafka"
    )
    broker = LocalBroker(home, RESTART_BROKER_PORT)
    broker.stop()
    broker.wipe()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        broker.wipe()


@pytest.mark.parametrize("outage_s", [5, 30])
def test_faults_broker_restart_pauses_and_resumes(
    simulator: TrackSimulator, outage_s: int
) -> None:
    """The broker stopping and starting again mid-run loses nothing. The group
    loses its partitions (the session times out) and takes them back; the
    transaction open at the stop fails, and a transactional producer the
    restart left unable to go on (stuck in send_offsets_to_transaction, aborts
    that never reach the coordinator, sequence numbers out of order) is
    replaced. Delivery resumes, and SIGTERM stops the worker promptly."""
    with _own_broker() as broker:
        run = _prepare(broker.bootstrap_servers, simulator, people=800, events=3200)
        # Slow answers (42 requests, 4 at a time): the outage falls mid-run.
        simulator.inject([Fault(200, count=10_000, delay_s=1.0)])
        worker = run.start()
        _wait_requests(simulator, 5)

        broker.stop()
        time.sleep(outage_s)
        broker.start()
        _wait_all_delivered(run, simulator, timeout_s=120)
        _wait_committed(run, timeout_s=120)
        worker.send_signal(signal.SIGTERM)
        _finish(worker, timeout_s=SHUTDOWN_BOUND_S)

        result = _account(run, simulator, f"broker_restart_{outage_s}s")
        _assert_nothing_lost(result)


def test_faults_sigterm_during_broker_outage_stops_by_the_deadline(
    simulator: TrackSimulator,
) -> None:
    """SIGTERM while the broker is away and a commit is blocked on it: the
    worker exits 0 within shutdown_timeout_s plus one last commit's timeout,
    and a worker started once the broker is back delivers everything."""
    shutdown_s = 5.0
    with _own_broker() as broker:
        run = _prepare(
            broker.bootstrap_servers, simulator, people=800, events=3200,
            CIO_TRACK__SHUTDOWN_TIMEOUT_S=str(shutdown_s),
        )  # fmt: skip
        simulator.inject([Fault(200, count=10_000, delay_s=1.0)])
        worker = run.start()
        _wait_requests(simulator, 5)

        broker.stop()
        time.sleep(2)
        stopping = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        _finish(worker, timeout_s=60)
        stop_s = time.monotonic() - stopping
        print(json.dumps({"scenario": "sigterm_during_broker_outage",
                          "seconds_to_stop": round(stop_s, 1)}))  # fmt: skip
        broker.start()
        second = run.start()
        _wait_all_delivered(run, simulator, timeout_s=120)
        # What the first worker delivered but could not commit, the second
        # reads again: it must have settled everything before it is stopped.
        _wait_committed(run, timeout_s=120)
        second.send_signal(signal.SIGTERM)
        _finish(second, timeout_s=SHUTDOWN_BOUND_S)

        result = _account(run, simulator, "sigterm_during_broker_outage")
        _assert_nothing_lost(result)
        # The deadline, one last commit's timeout, then closing the clients.
        assert stop_s < shutdown_s + TRANSACTION_TIMEOUT_S + 5, stop_s


def test_faults_three_workers_one_killed_one_added_lose_nothing(
    kafka_bootstrap: str, simulator: TrackSimulator
) -> None:
    """Three members on 6 partitions; one is killed with SIGKILL and another
    joins: every record arrives, and only batches in flight are sent twice."""
    run = _prepare(kafka_bootstrap, simulator, people=1200, events=4800, partitions=6)
    simulator.inject([Fault(200, count=10_000, delay_s=0.05)])
    workers = [run.start(CIO_KAFKA__GROUP_INSTANCE_ID=f"w{i}") for i in range(3)]
    _wait_requests(simulator, 10)

    workers[0].send_signal(signal.SIGKILL)
    workers[0].wait(timeout=30)
    workers.append(run.start(CIO_KAFKA__GROUP_INSTANCE_ID="w3"))
    _wait_all_delivered(run, simulator, timeout_s=180)
    for worker in workers[1:]:
        worker.send_signal(signal.SIGTERM)
    for worker in workers[1:]:
        _finish(worker, timeout_s=60)

    result = _account(run, simulator, "three_workers_kill_and_add")
    _assert_nothing_lost(result)
    # Re-sent entries come only from the killed member's batches in flight:
    # at most max_concurrency (4) batches of 100 entries being sent, plus as
    # many whose answer had arrived but whose transaction was not committed.
    assert result["events_sent_twice"] + result["identify_sent_twice"] <= 800


def _wait_requests(simulator: TrackSimulator, count: int) -> None:
    deadline = time.monotonic() + 60
    while simulator.snapshot()["stats"]["requests"] < count:
        assert time.monotonic() < deadline, "the worker sent nothing"
        time.sleep(0.05)
