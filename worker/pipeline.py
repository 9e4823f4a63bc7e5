"""One consumed record to one batch item: decode, map, check. No I/O but the
schema registry's, on the first sight of a schema id.

Every failure of a record here is an ``InvalidRecordError``, caught and carried
on the item as a ``Reject``, so a bad record is dead-lettered in offset order
with the rest of its batch and the worker never stops for data. A person
tombstone the policy ignores becomes a skipped item: it is committed with its
batch, counted as skipped and sent nowhere. ``TransientError`` (the schema
registry is down) is not caught: the record is fine and must not be settled.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import structlog
from fastavro.utils import generate_many

from worker.avro import (
    AvroDecoder,
    Decoder,
    FramedDecoder,
    encode,
    load_schema,
    read_record,
)
from worker.batcher import Item
from worker.errors import ConfigError, DecodeError, InvalidRecordError
from worker.limits import checked_entry
from worker.mapping import (
    Coordinates,
    RecordShape,
    TopicMapping,
    to_event,
    to_identify,
    to_person_action,
)
from worker.registry import SchemaRegistry, http_getter
from worker.rejects import Reject
from worker.settings import Settings

log = structlog.get_logger(__name__)

TombstonePolicy = Literal["ignore", "delete", "suppress"]


class Kind(Enum):
    PERSON = "person"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class TopicRoute:
    """How records of one input topic are read and mapped.

    Without a ``mapping``, people are identified by ``person_email`` and the
    shape (nested records, marked timestamps) is read from the decoder's schema.
    """

    kind: Kind
    decoder: Decoder
    # None is replaced in __post_init__, so readers always see a TopicMapping.
    mapping: TopicMapping = None  # type: ignore[assignment]
    tombstones: TombstonePolicy = "ignore"

    def __post_init__(self) -> None:
        if self.mapping is None:
            shape = RecordShape.of(self.decoder.schema)
            object.__setattr__(self, "mapping", TopicMapping(shape=shape))


def to_item(message: Any, route: TopicRoute) -> Item:
    """Turn a Kafka message into a batch item: an entry, a reject, or neither."""
    offset = message.offset()
    try:
        value = message.value()
        if value is None:
            entry = _tombstone_entry(message, route)
            if entry is None:
                return Item(offset, message, skipped=True)
        else:
            entry = _entry(message, route.decoder.decode(value), route)
        entry_bytes = checked_entry(entry)
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
    return Item(offset, message, entry=entry_bytes, data=entry)


def build_routes(settings: Settings) -> dict[str, TopicRoute]:
    """The person and event topics' routes, from the settings; ConfigError if
    a schema or the identity settings do not fit together."""
    schemas, mapping = settings.schemas, settings.mapping
    registry = _registry(settings)
    person = _route(
        Kind.PERSON,
        schemas.person,
        schemas.person_format,
        schemas.person_writer,
        registry,
        TopicMapping(mapping.person_identifier, mapping.person_identifier_field),
        mapping.person_tombstones,
    )
    event = _route(
        Kind.EVENT,
        schemas.event,
        schemas.event_format,
        schemas.event_writer,
        registry,
        TopicMapping(mapping.event_identifier, mapping.event_identifier_field),
    )
    return {settings.kafka.person_topic: person, settings.kafka.event_topic: event}


def _entry(message: Any, record: dict[str, Any], route: TopicRoute) -> dict[str, Any]:
    if route.kind is Kind.PERSON:
        return to_identify(record, route.mapping)
    _, timestamp_ms = message.timestamp()
    coordinates = Coordinates(
        message.topic(), message.partition(), message.offset(), timestamp_ms
    )
    return to_event(record, coordinates, route.mapping)


def _tombstone_entry(message: Any, route: TopicRoute) -> dict[str, Any] | None:
    """The entry a null value stands for, or None when it is skipped."""
    if route.kind is Kind.EVENT:
        raise DecodeError(
            "tombstone",
            "the event record has no value (a tombstone); an event cannot be "
            "deleted, so producers must not write tombstones to the event topic",
        )
    if route.tombstones == "ignore":
        log.debug(
            "tombstone_skipped",
            topic=message.topic(),
            partition=message.partition(),
            offset=message.offset(),
        )
        return None
    return to_person_action(message.key(), route.tombstones, route.mapping)


def _route(
    kind: Kind,
    path: Path,
    framing: str,
    writer_path: Path | None,
    registry: SchemaRegistry | None,
    identity: TopicMapping,
    tombstones: TombstonePolicy = "ignore",
) -> TopicRoute:
    schema = load_schema(path, f"CIO_SCHEMAS__{kind.name}")
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise ConfigError(f"the {kind.value} schema {path} must be an Avro record")
    writer = _writer_schema(kind, writer_path, schema)
    decoder: Decoder = AvroDecoder(schema, writer)
    if registry is not None and framing in ("confluent", "auto"):
        decoder = FramedDecoder(
            schema, registry, plain_fallback=framing == "auto", plain_writer=writer
        )
    if identity.identifier_field not in {f["name"] for f in schema["fields"]}:
        setting = f"CIO_MAPPING__{kind.name}_IDENTIFIER_FIELD"
        raise ConfigError(
            f"the {kind.value} schema {path} has no field "
            f"{identity.identifier_field!r}, which {setting} names as the "
            f"person's {identity.identifier_type}"
        )
    shape = RecordShape.of(schema)
    mapping = TopicMapping(identity.identifier_type, identity.identifier_field, shape)
    return TopicRoute(kind, decoder, mapping, tombstones)


def _writer_schema(kind: Kind, path: Path | None, reader: Any) -> Any:
    """The parsed writer schema of plain values; None when plain values use
    the reader schema. Avro resolves a record only to one of the same full
    name, which is checked here; field by field it is checked per record
    (``schema_mismatch``), and ``cio-worker check`` tries it on real records."""
    if path is None:
        return None
    setting = f"CIO_SCHEMAS__{kind.name}_WRITER"
    writer = load_schema(path, setting)
    if not isinstance(writer, dict) or writer.get("type") != "record":
        raise ConfigError(f"the {kind.value} writer schema {path} ({setting}) "
                          "must be an Avro record")  # fmt: skip
    if writer.get("name") != reader.get("name"):
        raise ConfigError(
            f"the {kind.value} writer schema {path} ({setting}) is the record "
            f"{writer.get('name')}, the {kind.value} schema the record "
            f"{reader.get('name')}: Avro resolves a record only to one of the "
            "same full name"
        )
    failed, problem = _resolution_failures(writer, reader)
    if failed == RESOLUTION_SAMPLES:
        raise ConfigError(
            f"records written with the {kind.value} writer schema {path} "
            f"({setting}) cannot be read as the {kind.value} schema: {problem}"
        )
    if failed:
        log.warning(
            "writer_schema_partly_readable",
            schema=str(path),
            failed=failed,
            of=RESOLUTION_SAMPLES,
            example=problem,
        )
    return writer


RESOLUTION_SAMPLES = 50


def _resolution_failures(writer: Any, reader: Any) -> tuple[int, str]:
    """How many of RESOLUTION_SAMPLES records generated from ``writer`` cannot
    be resolved to ``reader``, and the first reason.

    Avro resolution fails on the values that do not fit. A field the reader
    needs without a default, or of a type that cannot be promoted, fails every
    record: that stops start-up instead of dead-lettering the whole topic. A
    union branch or enum symbol the reader lacks fails only the records that
    use it, which may be none in practice: a warning.
    """
    failed, problem = 0, ""
    try:
        records = list(generate_many(writer, RESOLUTION_SAMPLES))
    except Exception:  # a schema fastavro can parse but not generate for
        return 0, ""  # (e.g. a record that must contain itself): no verdict
    for record in records:
        try:
            read_record(encode(writer, record), 0, writer, reader)
        except DecodeError as exc:
            failed += 1
            problem = problem or exc.message
    return failed, problem


def _registry(settings: Settings) -> SchemaRegistry | None:
    schemas = settings.schemas
    if not schemas.registry_url:
        return None
    password = schemas.registry_password
    get = http_getter(
        schemas.registry_username,
        password.get_secret_value() if password else "",
        schemas.registry_timeout_s,
    )
    return SchemaRegistry(schemas.registry_url, get)
