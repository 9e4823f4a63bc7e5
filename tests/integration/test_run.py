"""`cio-worker run` end to end on the real broker and the Track API simulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ulid import ULID

from tests.integration.cli import run_cli
from tests.integration.conftest import ROOT, Topics
from tests.integration.kafka_tools import committed_offsets, end_offsets, read_all
from worker.avro import encode, load_schema
from worker.loop import Worker
from worker.rejects import header_map
from worker.sandbox.sample import Sample, SampleRecord, produce
from worker.sandbox.simulator import Fault, TrackSimulator
from worker.settings import load_settings

pytestmark = pytest.mark.integration

PERSON_SCHEMA = load_schema(ROOT / "schemas" / "person.avsc")
EVENT_SCHEMA = load_schema(ROOT / "schemas" / "person_event.avsc")


def _person(email: str, **fields: Any) -> dict[str, Any]:
    return {"person_email": email, **fields}


def _event(email: str, name: str, **fields: Any) -> dict[str, Any]:
    return {"person_email": email, "event_name": name, **fields}


def _known_sample(
    people: int = 150, events: int = 400
) -> tuple[Sample, dict[str, Any]]:
    """A sample whose every expected outcome is written down beside it."""
    sample = Sample()
    expected_people: dict[str, dict[str, Any]] = {}
    expected_events: list[tuple[str, str, int, str | None]] = []
    for i in range(people):
        email = f"Person{i}@Example.com"
        first = _person(email, plan="free", first_name=f"P{i}", attributes={"n": i})
        second = _person(email, plan="growth", is_active=True)
        for record in (first, second):  # same key: same partition, order kept
            sample.records.append(
                SampleRecord("person", email.encode(), encode(PERSON_SCHEMA, record))
            )
        expected_people[f"email:{email.lower()}"] = {
            "plan": "growth",
            "first_name": f"P{i}",
            "n": i,
            "is_active": True,
        }
    for i in range(events):
        email = f"Person{i % people}@Example.com"
        given = str(ULID.from_timestamp(1_700_000_000 + i)) if i % 2 else None
        record = _event(
            email,
            f"ev_{i % 7}",
            event_id=given,
            timestamp=1_760_000_000 + i,
            data={"i": i},
        )
        sample.records.append(
            SampleRecord("event", email.encode(), encode(EVENT_SCHEMA, record))
        )
        expected_events.append(
            (f"email:{email.lower()}", f"ev_{i % 7}", 1_760_000_000 + i, given)
        )
    refused = [
        SampleRecord(
            "event",
            b"r1",
            encode(EVENT_SCHEMA, _event("r1@x.io", "n" * 101)),
            ("api", "too_long"),
        ),
        SampleRecord(
            "person",
            b"r2",
            encode(PERSON_SCHEMA, _person("r2@x.io", last_name="é" * 501)),
            ("api", "too_long"),
        ),
        SampleRecord("event", b"r3", b"\x00\x01garbage", ("decode", "")),
        SampleRecord(
            "person",
            b"r4",
            encode(PERSON_SCHEMA, _person("")),
            ("validate", "missing_identifier"),
        ),
    ]
    sample.records.extend(refused)
    return sample, {"people": expected_people, "events": expected_events}


def _worker_counts(worker: Worker) -> dict[str, Any]:
    return worker.counters.as_dict()


def test_run_until_caught_up_delivers_exactly_the_expected_people_and_events(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
) -> None:
    """Every valid record reaches the API once, every refused one is dead-lettered
    with its reason, and the committed offsets equal the end offsets."""
    sample, expected = _known_sample()
    produce(kafka_bootstrap, sample, topics.person, topics.event)

    counters = Worker(load_settings(), until_caught_up=True).run()

    people = simulator.people()
    assert {k: people[k] for k in expected["people"]} == expected["people"]
    events = simulator.events()
    got = sorted((e["person"], e["name"], e["timestamp"]) for e in events)
    assert got == sorted((p, n, t) for p, n, t, _ in expected["events"])
    ids = [e["id"] for e in events]
    assert len(set(ids)) == len(ids) == len(expected["events"])
    given = {i for *_, i in expected["events"] if i}
    assert given <= set(ids)

    dead = read_all(kafka_bootstrap, topics.dead_letter)
    assert len(dead) == 4 == counters.rejected
    stages = sorted(header_map(m.headers())["stage"] for m in dead)
    assert stages == ["decode", "validate", "validate", "validate"]
    for message in dead:
        headers = header_map(message.headers())
        assert headers["reason"]
        assert headers["message"]
        assert headers["source.topic"] in (topics.person, topics.event)
        assert message.value() in {r.value for r in sample.records}
    assert counters.consumed == len(sample.records)
    assert counters.delivered + counters.rejected == counters.consumed

    for topic in (topics.person, topics.event):
        assert committed_offsets(kafka_bootstrap, topics.group, topic) == end_offsets(
            kafka_bootstrap, topic
        )


def _start_worker(env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "run", *extra],
        env={
            **os.environ,
            **env,
            "CIO_BATCH__MAX_ENTRIES": "20",
            "CIO_BATCH__LINGER_MS": "20",
        },
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_run_stopped_midway_and_restarted_loses_nothing(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
) -> None:
    """A worker stopped by SIGTERM after some batches commits only what it
    delivered, and a second run delivers the rest: nothing is missing."""
    sample, expected = _known_sample(people=100, events=600)
    produce(kafka_bootstrap, sample, topics.person, topics.event)
    simulator.inject([Fault(status=200, count=10_000, delay_s=0.05)])

    first = _start_worker(worker_env)
    deadline = time.monotonic() + 60
    while simulator.snapshot()["stats"]["requests"] < 8:
        assert time.monotonic() < deadline, "the worker sent nothing"
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert '"worker_stopped"' in stderr

    accepted_first = simulator.snapshot()["stats"]["entries_accepted"]
    committed = sum(
        max(o, 0)
        for t in (topics.person, topics.event)
        for o in committed_offsets(kafka_bootstrap, topics.group, t).values()
    )
    assert 0 < committed < len(sample.records)
    assert accepted_first < len(sample.records) - 4

    simulator.clear_faults()
    second = run_cli(worker_env, "run", "--until-caught-up")
    assert second.returncode == 0, second.stderr

    people = simulator.people()
    assert {k: people[k] for k in expected["people"]} == expected["people"]
    got = sorted((e["person"], e["name"], e["timestamp"]) for e in simulator.events())
    assert got == sorted((p, n, t) for p, n, t, _ in expected["events"])
    assert len(read_all(kafka_bootstrap, topics.dead_letter)) >= 4
    for topic in (topics.person, topics.event):
        assert committed_offsets(kafka_bootstrap, topics.group, topic) == end_offsets(
            kafka_bootstrap, topic
        )


def test_run_with_missing_topic_exits_2_with_what_to_fix(
    worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topic that does not exist stops the worker at start-up, naming it."""
    env = {**worker_env, "CIO_KAFKA__EVENT_TOPIC": "no-such-topic"}

    result = run_cli(env, "run", timeout_s=60)

    assert result.returncode == 2
    assert "no-such-topic" in result.stderr
    assert "CIO_KAFKA__" in result.stderr


def test_run_never_logs_the_api_key(
    worker_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    simulator: TrackSimulator,
) -> None:
    """The Track API key appears nowhere in a whole run's output or dead letters."""
    sample, _ = _known_sample(people=20, events=40)
    produce(kafka_bootstrap, sample, topics.person, topics.event)

    env = {**worker_env, "CIO_LOG__LEVEL": "DEBUG"}
    result = run_cli(env, "run", "--until-caught-up")

    assert result.returncode == 0, result.stderr
    key = worker_env["CIO_API_KEY"]
    assert key not in result.stdout
    assert key not in result.stderr
    assert '"batch_sent"' in result.stderr
    for message in read_all(kafka_bootstrap, topics.dead_letter):
        assert (
            key.encode()
            not in json.dumps(
                [(k, v.decode("latin-1")) for k, v in message.headers()]
            ).encode()
        )
    assert Path(ROOT / "config" / "worker.toml").read_text().count(key) == 0
