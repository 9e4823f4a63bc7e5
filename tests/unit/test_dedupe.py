"""Worker._dedupe decides the same from the entry's dict carried on the item as
from the entry's bytes parsed again, and drops the dict afterwards."""

from __future__ import annotations

import dataclasses
import itertools
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Message

from worker.avro import AvroDecoder, encode, load_schema
from worker.batcher import Item
from worker.loop import Worker
from worker.pipeline import Kind, TopicRoute, to_item
from worker.sandbox.sample import event_record, person_record
from worker.state import EventDedupe, PartitionState, PersonDedupe

ROOT = Path(__file__).resolve().parents[2]


def _messages() -> list[Any]:
    """People (some sent twice, some changed) and events (some repeated)."""
    person_schema = load_schema(ROOT / "schemas" / "person.avsc")
    event_schema = load_schema(ROOT / "schemas" / "person_event.avsc")
    rng = random.Random(8)
    people = [person_record(f"p{n}@example.com", rng, 3) for n in range(30)]
    people += [dict(p) for p in people[:10]]  # unchanged repeats
    people += [{**p, "plan": "changed"} for p in people[10:20]]
    messages = []
    for offset, person in enumerate(people):
        messages.append(
            Message(
                topic="persons",
                partition=0,
                offset=offset,
                key=person["person_email"].encode(),
                value=encode(person_schema, person),
                timestamp=(1, 1_700_000_000_000),
            )
        )
    for offset in range(40):
        record = event_record(f"p{offset % 7}@example.com", rng, offset)
        if offset % 3 == 0:
            record["event_id"] = "01HZY6M3Z5QK0V8W2X9Y7T6R" + f"{offset % 6:02d}"
        messages.append(
            Message(topic="events", partition=0, offset=offset % 20,
                    key=b"k", value=encode(event_schema, record),
                    timestamp=(1, 1_700_000_000_000 + offset % 20))
        )  # fmt: skip
    return messages


@pytest.fixture(scope="module")
def routes() -> dict[str, TopicRoute]:
    return {
        "persons": TopicRoute(
            Kind.PERSON, AvroDecoder(load_schema(ROOT / "schemas" / "person.avsc"))
        ),
        "events": TopicRoute(
            Kind.EVENT, AvroDecoder(load_schema(ROOT / "schemas" / "person_event.avsc"))
        ),
    }


def _run(
    routes: dict[str, TopicRoute],
    person: PersonDedupe,
    event: EventDedupe,
    ignore_state: bool,
    carry: bool,
) -> list[tuple[Any, ...]]:
    loop = SimpleNamespace(
        _states={0: PartitionState()},
        _person_dedupe=person,
        _event_dedupe=event,
        _ignore_state=ignore_state,
        _wall_clock=lambda: 1_700_000_123.5,
    )
    outcomes = []
    for message in _messages():
        item = to_item(message, routes[message.topic()])
        assert item.data is not None
        if not carry:
            item.data = None  # as an item built without it: parsed again
        Worker._dedupe(loop, item, 0)  # type: ignore[arg-type]
        assert item.data is None
        outcomes.append(
            (item.entry, item.skipped, item.state_update, item.state_partition)
        )
    return outcomes


@pytest.mark.parametrize(
    ("person", "event", "ignore_state"),
    list(itertools.product(PersonDedupe, EventDedupe, [False, True])),
)
def test_carried_entry_decides_as_the_parsed_entry(
    routes: dict[str, TopicRoute],
    person: PersonDedupe,
    event: EventDedupe,
    ignore_state: bool,
) -> None:
    carried = _run(routes, person, event, ignore_state, carry=True)
    parsed = _run(routes, person, event, ignore_state, carry=False)

    assert carried == parsed
    if person is not PersonDedupe.OFF and not ignore_state:
        assert any(skipped for _, skipped, _, _ in carried)


def test_item_without_state_partition_drops_the_dict() -> None:
    """No state for the partition: nothing is decided, the dict is dropped."""
    loop = SimpleNamespace(_states={})
    item = Item(0, None, entry=b"{}", data={"action": "event"})

    Worker._dedupe(loop, item, 3)  # type: ignore[arg-type]

    assert item.data is None
    assert item.state_partition == -1
    assert dataclasses.replace(item).entry == b"{}"
