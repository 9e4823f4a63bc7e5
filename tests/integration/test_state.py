"""Dedupe state, replay, offsets reset and redrive on the real broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from tests.integration.cli import run_cli
from tests.integration.conftest import ROOT, Topics
from tests.integration.kafka_tools import committed_offsets, read_all
from worker.avro import encode, load_schema
from worker.loop import Worker
from worker.mapping import Coordinates, derive_event_id
from worker.rejects import StoredDeadLetter, assemble, header_map
from worker.sandbox.sample import Sample, SampleRecord, produce
from worker.sandbox.simulator import TrackSimulator
from worker.settings import load_settings

pytestmark = pytest.mark.integration

PERSON_SCHEMA = load_schema(ROOT / "schemas" / "person.avsc")
EVENT_SCHEMA = load_schema(ROOT / "schemas" / "person_event.avsc")


def _people(count: int, plan: str = "free") -> Sample:
    sample = Sample()
    for i in range(count):
        email = f"p{i}@example.com"
        record = {"person_email": email, "plan": plan, "attributes": {"i": i}}
        sample.records.append(
            SampleRecord("person", email.encode(), encode(PERSON_SCHEMA, record))
        )
    return sample


def _events(count: int, start: int = 0) -> Sample:
    sample = Sample()
    for i in range(start, start + count):
        email = f"p{i % 50}@example.com"
        record = {
            "person_email": email,
            "event_name": "viewed",
            "timestamp": 1_760_000_000 + i,
        }
        sample.records.append(
            SampleRecord("event", email.encode(), encode(EVENT_SCHEMA, record))
        )
    return sample


def _stats(simulator: TrackSimulator) -> dict[str, Any]:
    stats: dict[str, Any] = simulator.snapshot()["stats"]
    return stats


def test_person_republished_unchanged_is_not_sent_again_even_after_restart(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
) -> None:
    """An identical person is skipped by the live state and, after a restart, by
    the state restored from the compacted topic; a changed one is sent."""
    produce(kafka_bootstrap, _people(40), topics.person, topics.event)
    first = Worker(load_settings(), until_caught_up=True).run()
    assert (first.delivered, first.skipped) == (40, 0)

    produce(kafka_bootstrap, _people(40), topics.person, topics.event)
    produce(kafka_bootstrap, _people(5, plan="growth"), topics.person, topics.event)
    second = run_cli(worker_env, "run", "--until-caught-up")

    assert second.returncode == 0, second.stderr
    assert '"state_restored"' in second.stderr
    assert _stats(simulator)["identify_calls"] == 45
    people = simulator.people()
    assert people["email:p0@example.com"]["plan"] == "growth"
    assert people["email:p10@example.com"]["plan"] == "free"
    assert '"skipped": 40' in second.stdout


def test_replay_of_delivered_data_sends_nothing_unless_forced(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
) -> None:
    """Replay skips what the state says was delivered; --ignore-state re-sends
    exactly the chosen range, and the group's offsets do not move."""
    produce(kafka_bootstrap, _events(300), topics.person, topics.event)
    Worker(load_settings(), until_caught_up=True).run()
    received = _stats(simulator)["entries_received"]
    committed = committed_offsets(kafka_bootstrap, topics.group, topics.event)

    plain = run_cli(worker_env, "replay", "--topic", topics.event, "--from-beginning")

    assert plain.returncode == 0, plain.stderr
    assert _stats(simulator)["entries_received"] == received
    assert '"skipped": 300' in plain.stdout

    forced = run_cli(
        worker_env,
        "replay",
        "--topic",
        topics.event,
        "--partitions",
        "1",
        "--from-offset",
        "10",
        "--to-offset",
        "30",
        "--ignore-state",
    )

    assert forced.returncode == 0, forced.stderr
    assert _stats(simulator)["entries_received"] == received + 20
    resent = [i for i, n in simulator.snapshot()["received_event_ids"].items() if n > 1]
    assert len(resent) == 20
    assert _stats(simulator)["duplicate_events"] == 20
    assert committed_offsets(kafka_bootstrap, topics.group, topics.event) == committed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from-offset", "999999"], "past the end"),
        (["--from-beginning", "--partitions", "7"], "no partition 7"),
        (["--from-time", "yesterday"], "cannot read time"),
    ],
)
def test_replay_impossible_range_exits_2_with_reason(
    worker_env: dict[str, str], topics: Topics, args: list[str], message: str
) -> None:
    """An offset past the end, an unknown partition or an unreadable time is a
    clear error before anything is sent."""
    result = run_cli(worker_env, "replay", "--topic", topics.event, *args)

    assert result.returncode == 2
    assert message in result.stderr


def test_offsets_reset_dry_run_prints_plan_and_changes_nothing(
    worker_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
) -> None:
    """A dry run shows each partition's move; a real run applies it."""
    produce(kafka_bootstrap, _events(60), topics.person, topics.event)
    Worker(load_settings(), until_caught_up=True).run()
    before = committed_offsets(kafka_bootstrap, topics.group, topics.event)

    dry = run_cli(
        worker_env,
        "offsets",
        "reset",
        "--topic",
        topics.event,
        "--to-beginning",
        "--dry-run",
    )

    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert "-> 0" in dry.stdout
    assert committed_offsets(kafka_bootstrap, topics.group, topics.event) == before

    real = run_cli(
        worker_env, "offsets", "reset", "--topic", topics.event, "--to-beginning"
    )

    assert real.returncode == 0, real.stderr
    after = committed_offsets(kafka_bootstrap, topics.group, topics.event)
    assert set(after.values()) == {0}


def test_redrive_delivers_fixed_records_and_returns_failures_with_attempts(
    worker_env: dict[str, str],
    topics: Topics,
    simulator: TrackSimulator,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Records refused under a wrong reader schema are delivered by redrive once
    the schema is fixed, under their original ids; records still bad go back to
    the dead-letter topic with their attempt count raised."""
    wrong = json.loads((ROOT / "schemas" / "person_event.avsc").read_text())
    wrong["fields"][0]["type"] = "long"  # person_email read as a number: garbage
    wrong_path = tmp_path / "wrong.avsc"
    wrong_path.write_text(json.dumps(wrong))
    long_name = {"person_email": "x@example.com", "event_name": "n" * 101}
    garbage = b"\x02not avro at all"
    sample = _events(20)
    sample.records.append(SampleRecord("event", b"x", encode(EVENT_SCHEMA, long_name)))
    sample.records.append(SampleRecord("event", b"y", garbage))
    produce(kafka_bootstrap, sample, topics.person, topics.event)
    monkeypatch.setenv("CIO_SCHEMAS__EVENT", str(wrong_path))
    first = Worker(load_settings(), until_caught_up=True).run()
    assert (first.delivered, first.rejected) == (0, 22)
    monkeypatch.delenv("CIO_SCHEMAS__EVENT")

    result = run_cli(worker_env, "dlq", "redrive", "--source-topic", topics.event)

    assert result.returncode == 0, result.stderr
    assert len(simulator.events()) == 20
    dead = read_all(kafka_bootstrap, topics.dead_letter)
    assert len(dead) == 24
    again = [header_map(m.headers()) for m in dead[22:]]
    assert sorted(h["attempts"] for h in again) == ["2", "2"]
    assert {h["source.topic"] for h in again} == {topics.event}
    assert {m.value() for m in dead[22:]} == {garbage, encode(EVENT_SCHEMA, long_name)}
    original = [
        header_map(m.headers()) for m in dead[:22] if m.key() not in (b"x", b"y")
    ]
    derived = {
        derive_event_id(
            Coordinates(
                h["source.topic"],
                int(h["source.partition"]),
                int(h["source.offset"]),
                int(h["source.timestamp"]),
            )
        )
        for h in original
    }
    assert {e["id"] for e in simulator.events()} == derived

    repeat = run_cli(worker_env, "dlq", "redrive", "--reason", "no_such_reason")

    assert repeat.returncode == 0, repeat.stderr
    assert '"consumed": 0' in repeat.stdout


def test_redrive_joins_a_chunked_dead_letter_and_chunks_it_again_on_failure(
    worker_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
) -> None:
    """A record too large for one dead letter is redriven whole: joined from its
    chunks, refused again, and written back as chunks with attempts raised."""
    huge = {"person_email": "big@example.com", "event_name": "big",
            "data": {"blob": "z" * 2_500_000}}  # fmt: skip
    value = encode(EVENT_SCHEMA, huge)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for topic in (topics.event, topics.dead_letter):
        entry = ConfigEntry(
            "max.message.bytes", "4000000", incremental_operation=AlterConfigOpType.SET
        )
        resource = ConfigResource("topic", topic, incremental_configs=[entry])
        admin.incremental_alter_configs([resource])[resource].result()
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000}
    )
    producer.produce(topics.event, key=b"big", value=value)
    assert producer.flush(30) == 0
    first = Worker(load_settings(), until_caught_up=True).run()
    assert first.rejected == 1

    result = run_cli(worker_env, "dlq", "redrive")

    assert result.returncode == 0, result.stderr
    rejected = assemble(
        [
            StoredDeadLetter.from_message(m)
            for m in read_all(kafka_bootstrap, topics.dead_letter)
        ]
    )
    assert [r.value == value for r in rejected] == [True, True]
    assert [r.first.reasons()["attempts"] for r in rejected] == ["1", "2"]
    assert all(len(r.parts) > 1 for r in rejected)
