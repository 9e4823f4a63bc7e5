"""The bounded commands: ``replay``, ``offsets reset`` and ``dlq redrive``.

Each plans its offset ranges first (an impossible range is a ConfigError, exit
2, before anything is sent), then runs the worker loop over them.
"""

from __future__ import annotations

import argparse
import json
import uuid
from typing import Any

import structlog
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from worker.errors import ConfigError, WorkerError
from worker.loop import Ranges, Worker
from worker.progress import Progress
from worker.redrive import RedriveFilter, RedriveReader
from worker.replay import (
    Position,
    committed_offsets,
    describe_plan,
    group_members,
    parse_time,
    plan_ranges,
)
from worker.settings import Settings, kafka_client_config

log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


def replay(settings: Settings, args: argparse.Namespace) -> int:
    """Deliver a range of one input topic again, without the group's offsets."""
    kafka = settings.kafka
    if args.topic not in (kafka.person_topic, kafka.event_topic):
        raise ConfigError(
            f"--topic {args.topic} is neither the person topic ({kafka.person_topic}) "
            f"nor the event topic ({kafka.event_topic})"
        )
    ranges = _plan(settings, args.topic, _partitions(args), _start(args), _end(args))
    total = sum(end - start for start, end in ranges.values())
    log.info("replay_planned", plan=describe_plan(ranges), offsets=total)
    progress = Progress("replay", total)
    return _run_ranges(settings, Ranges(ranges), args.ignore_state, progress)


def redrive(settings: Settings, args: argparse.Namespace) -> int:
    """Process matching dead letters again, as the records they were."""
    topic = settings.kafka.dead_letter_topic
    inputs = {settings.kafka.person_topic, settings.kafka.event_topic}
    unknown = sorted(set(args.source_topic) - inputs)
    if unknown:
        raise ConfigError(
            f"--source-topic {', '.join(unknown)} is not the person or event topic "
            f"({', '.join(sorted(inputs))}); set CIO_KAFKA__PERSON_TOPIC / "
            "CIO_KAFKA__EVENT_TOPIC to the topics those records came from"
        )
    start = (
        Position("time", parse_time(args.since))
        if args.since
        else Position("beginning")
    )
    ranges = _plan(settings, topic, None, start, Position("end"))
    keep = RedriveFilter(
        reasons=frozenset(args.reason),
        stages=frozenset(args.stage),
        source_topics=frozenset(args.source_topic),
        until_ms=parse_time(args.until) if args.until else None,
    )
    total = sum(end - start for start, end in ranges.values())
    log.info("redrive_planned", plan=describe_plan(ranges), dead_letters=total)
    progress = Progress("redrive", total)
    return _run_ranges(
        settings, Ranges(ranges, wrap=RedriveReader(), keep=keep), False, progress
    )


def reset_offsets(settings: Settings, args: argparse.Namespace) -> int:
    """Set the group's committed offsets; print the plan; change nothing if dry."""
    kafka = settings.kafka
    inputs = [kafka.person_topic, kafka.event_topic]
    if args.topic and args.topic not in inputs:
        raise ConfigError(
            f"--topic {args.topic} is neither the person topic ({kafka.person_topic}) "
            f"nor the event topic ({kafka.event_topic})"
        )
    topics = [args.topic] if args.topic else inputs
    if args.to_beginning:
        target = Position("beginning")
    elif args.to_end:
        target = Position("end")
    elif args.to_offset is not None:
        target = Position("offset", args.to_offset)
    else:
        target = Position("time", parse_time(args.to_time))
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for topic in topics:
        ranges.update(
            _plan(settings, topic, _partitions(args), target, Position("end"))
        )

    consumer = _consumer(settings, kafka.group_id)
    try:
        committed = committed_offsets(consumer, list(ranges))
    finally:
        consumer.close()
    print(f"group {kafka.group_id}: reset to {target.describe()}")
    print(describe_plan(ranges, committed))
    if args.dry_run:
        print("dry run: nothing changed")
        return EXIT_OK

    admin = AdminClient(kafka_client_config(settings, "admin"))
    members = group_members(admin, kafka.group_id)
    if members:
        raise ConfigError(
            f"group {kafka.group_id} has {members} running members; stop the workers "
            "before moving its offsets"
        )
    request = ConsumerGroupTopicPartitions(
        kafka.group_id,
        [TopicPartition(t, p, start) for (t, p), (start, _) in ranges.items()],
    )
    try:
        admin.alter_consumer_group_offsets([request])[kafka.group_id].result()
    except KafkaException as exc:
        raise WorkerError(f"offsets not changed: {exc.args[0]}") from exc
    print("offsets changed")
    return EXIT_OK


def _run_ranges(
    settings: Settings, ranges: Ranges, ignore_state: bool, progress: Progress
) -> int:
    worker = Worker(
        settings, ranges=ranges, ignore_state=ignore_state, progress=progress.update
    )
    worker.install_signal_handlers()
    counters = worker.run()
    progress.update(counters.consumed, final=True)
    print(json.dumps(counters.as_dict()), flush=True)
    return EXIT_OK


def _plan(
    settings: Settings,
    topic: str,
    partitions: list[int] | None,
    start: Position,
    end: Position,
) -> dict[tuple[str, int], tuple[int, int]]:
    consumer = _consumer(settings, f"cio-worker-plan-{uuid.uuid4().hex[:8]}")
    try:
        return plan_ranges(consumer, topic, partitions, start, end)
    except KafkaException as exc:
        raise ConfigError(
            f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc.args[0]}"
        ) from exc
    finally:
        consumer.close()


def _consumer(settings: Settings, group_id: str) -> Consumer:
    config: dict[str, Any] = {
        **kafka_client_config(settings, "admin"),
        "group.id": group_id,
        "enable.auto.commit": False,
    }
    return Consumer(config)


def _partitions(args: argparse.Namespace) -> list[int] | None:
    if not args.partitions:
        return None
    try:
        return [int(p) for p in args.partitions.split(",")]
    except ValueError:
        raise ConfigError(
            f"--partitions {args.partitions!r}: use comma-separated numbers"
        ) from None


def _start(args: argparse.Namespace) -> Position:
    if args.from_beginning:
        return Position("beginning")
    if args.from_offset is not None:
        return Position("offset", args.from_offset)
    return Position("time", parse_time(args.from_time))


def _end(args: argparse.Namespace) -> Position:
    if args.to_offset is not None:
        return Position("offset", args.to_offset)
    if args.to_time:
        return Position("time", parse_time(args.to_time))
    return Position("end")
