"""`kill -9` during delivery, then a restart: nothing lost, nothing doubled.

Each trial writes 20,000 records (6,000 people, 14,000 events with known ids
and offsets), starts a worker, kills it with SIGKILL after a random number of
requests, and restarts it until caught up. The simulator then must hold every
person and every event exactly once, and every entry the API received twice
must come from a batch that was in flight at the kill: sent, but past the
offsets committed when the worker died. ``CRASH_TRIALS`` sets the number of
trials (default 20); each trial prints its counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from ulid import ULID

from tests.integration.conftest import ROOT
from tests.integration.kafka_tools import committed_offsets
from worker.avro import encode, load_schema
from worker.sandbox.sample import create_topics
from worker.sandbox.simulator import Fault, TrackSimulator

pytestmark = pytest.mark.integration

PEOPLE = 6_000
EVENTS = 14_000
PARTITIONS = 3
MAX_ENTRIES = 200
TRIALS = int(os.environ.get("CRASH_TRIALS", "20"))

PERSON_SCHEMA = load_schema(ROOT / "schemas" / "person.avsc")
EVENT_SCHEMA = load_schema(ROOT / "schemas" / "person_event.avsc")


def _produce(bootstrap: str, person_topic: str, event_topic: str) -> dict[str, Any]:
    """Write the trial's records; return each event id's (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    where: dict[str, tuple[int, int]] = {}

    def on_delivery(error: Any, message: Any) -> None:
        assert error is None, error
        if message.topic() == event_topic:
            where[message.key().decode()] = (message.partition(), message.offset())

    for i in range(PEOPLE):
        email = f"u{i}@example.com"
        record = {"person_email": email, "plan": "growth", "attributes": {"n": i}}
        producer.produce(
            person_topic,
            key=email.encode(),
            value=encode(PERSON_SCHEMA, record),
            partition=i % PARTITIONS,
        )
        producer.poll(0)
    for i in range(EVENTS):
        event_id = str(ULID.from_timestamp(1_760_000_000 + i))
        record = {
            "person_email": f"u{i % PEOPLE}@example.com",
            "event_name": "clicked",
            "event_id": event_id,
            "timestamp": 1_760_000_000 + i,
        }
        producer.produce(
            event_topic,
            key=event_id.encode(),
            value=encode(EVENT_SCHEMA, record),
            partition=i % PARTITIONS,
            on_delivery=on_delivery,
        )
        producer.poll(0)
    assert producer.flush(60) == 0
    assert len(where) == EVENTS
    return where


def _env(base: dict[str, str], run: str) -> dict[str, str]:
    return {
        **os.environ, **base,
        "CIO_KAFKA__GROUP_ID": f"g-{run}",
        "CIO_KAFKA__PERSON_TOPIC": f"c-{run}.persons",
        "CIO_KAFKA__EVENT_TOPIC": f"c-{run}.events",
        "CIO_KAFKA__DEAD_LETTER_TOPIC": f"c-{run}.dead-letters",
        "CIO_BATCH__MAX_ENTRIES": str(MAX_ENTRIES),
        "CIO_BATCH__LINGER_MS": "50",
        # The restarted worker takes the killed one's place at once.
        "CIO_KAFKA__GROUP_INSTANCE_ID": f"w-{run}",
    }  # fmt: skip


def _trial(
    seed: int, bootstrap: str, simulator: TrackSimulator, base_env: dict[str, str]
) -> dict[str, Any]:
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:10]
    env = _env(base_env, run)
    person_topic, event_topic = (
        env["CIO_KAFKA__PERSON_TOPIC"],
        env["CIO_KAFKA__EVENT_TOPIC"],
    )
    create_topics(
        bootstrap,
        {person_topic: PARTITIONS, event_topic: PARTITIONS,
         env["CIO_KAFKA__DEAD_LETTER_TOPIC"]: 1},
    )  # fmt: skip
    where = _produce(bootstrap, person_topic, event_topic)
    simulator.reset()
    simulator.inject([Fault(status=200, count=100_000, delay_s=0.02)])
    kill_after = rng.randint(1, (PEOPLE + EVENTS) // MAX_ENTRIES - 5)

    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"], env=env, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while simulator.snapshot()["stats"]["requests"] < kill_after:
        assert worker.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    time.sleep(0.5)  # requests the simulator was still answering land first
    at_kill = simulator.snapshot()
    committed = committed_offsets(bootstrap, env["CIO_KAFKA__GROUP_ID"], event_topic)
    in_flight = {
        event_id
        for event_id in at_kill["received_event_ids"]
        if where[event_id][1] >= committed[where[event_id][0]]
    }

    simulator.clear_faults()
    restart = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--until-caught-up"], env=env,
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert restart.returncode == 0, restart.stderr[-3000:]

    final = simulator.snapshot()
    events = final["events"]
    ids = [e["id"] for e in events]
    resent = {i for i, n in final["received_event_ids"].items() if n > 1}
    identify_repeats = sum(n - 1 for n in final["identify_counts"].values())
    return {
        "seed": seed,
        "kill_after_requests": kill_after,
        "events_recorded": len(ids),
        "distinct_events": len(set(ids)),
        "people": len(final["people"]),
        "events_in_flight_at_kill": len(in_flight),
        "events_sent_twice": len(resent),
        "resent_outside_in_flight": len(resent - in_flight),
        "identify_sent_twice": identify_repeats,
        "lost_events": len(set(where) - set(ids)),
    }


@pytest.mark.timeout(1500)
def test_kill_9_during_delivery_then_restart_loses_nothing_and_doubles_nothing(
    worker_env: dict[str, str],
    simulator: TrackSimulator,
    kafka_bootstrap: str,
) -> None:
    """Over many random SIGKILLs, no record is lost, no event is recorded twice,
    and only entries of batches in flight at the kill are sent twice."""
    results = []
    for trial in range(TRIALS):
        result = _trial(1000 + trial, kafka_bootstrap, simulator, worker_env)
        print(json.dumps(result))
        results.append(result)

        assert result["lost_events"] == 0
        assert result["events_recorded"] == result["distinct_events"] == EVENTS
        assert result["people"] == PEOPLE
        assert result["resent_outside_in_flight"] == 0

    summary = {
        "trials": len(results),
        "events_sent_twice_max": max(r["events_sent_twice"] for r in results),
        "events_in_flight_at_kill_max": max(
            r["events_in_flight_at_kill"] for r in results
        ),
        "identify_sent_twice_max": max(r["identify_sent_twice"] for r in results),
    }
    print(json.dumps(summary))
