"""One consumed record to one batch item: decode, map, check. Pure, no I/O.

Every failure here is an ``InvalidRecordError``, caught and carried on the item
as a ``Reject``, so a bad record is dead-lettered in offset order with the rest
of its batch and the worker never stops for data.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import structlog

from worker.avro import AvroDecoder
from worker.batcher import Item
from worker.errors import InvalidRecordError
from worker.limits import check_entry_size
from worker.mapping import Coordinates, serialize, to_event, to_identify
from worker.rejects import Reject

log = structlog.get_logger(__name__)


class Kind(Enum):
    PERSON = "person"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class TopicRoute:
    """How records of one input topic are read and mapped."""

    kind: Kind
    decoder: AvroDecoder


def to_item(message: Any, route: TopicRoute) -> Item:
    """Turn a Kafka message into a batch item: an entry, or a reject."""
    offset = message.offset()
    try:
        record = route.decoder.decode(message.value())
        if route.kind is Kind.PERSON:
            entry = to_identify(record)
        else:
            _, timestamp_ms = message.timestamp()
            coordinates = Coordinates(
                message.topic(), message.partition(), offset, timestamp_ms
            )
            entry = to_event(record, coordinates)
        entry_bytes = serialize(entry)
        check_entry_size(entry_bytes)
    except InvalidRecordError as exc:
        log.debug(
            "record_rejected",
            topic=message.topic(),
            partition=message.partition(),
            offset=offset,
            stage=exc.stage,
            reason=exc.reason,
        )
        reject = Reject(exc.stage, exc.reason, exc.message, exc.field)
        return Item(offset, message, reject=reject)
    return Item(offset, message, entry=entry_bytes)
