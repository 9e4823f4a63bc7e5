"""Unit tests of worker.pipeline.to_item: one message to one batch item."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema
from structlog.testing import capture_logs

from tests.unit.fakes import FakeMessage
from tests.unit.test_avro import FakeRegistry
from worker.avro import AvroDecoder, FramedDecoder, encode, encode_framed, load_schema
from worker.errors import ConfigError, TransientError
from worker.mapping import Coordinates, derive_event_id, serialize, to_identify
from worker.pipeline import Kind, TopicRoute, build_routes, to_item
from worker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def person_schema() -> Any:
    return load_schema(ROOT / "schemas" / "person.avsc")


@pytest.fixture(scope="module")
def event_schema() -> Any:
    return load_schema(ROOT / "schemas" / "person_event.avsc")


@pytest.fixture(scope="module")
def person_route(person_schema: Any) -> TopicRoute:
    return TopicRoute(Kind.PERSON, AvroDecoder(person_schema))


@pytest.fixture(scope="module")
def event_route(event_schema: Any) -> TopicRoute:
    return TopicRoute(Kind.EVENT, AvroDecoder(event_schema))


def test_to_item_person_record_becomes_identify_entry(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """A person record becomes an item carrying its identify entry bytes."""
    value = encode(person_schema, {"person_email": "ann@example.com", "plan": "pro"})
    message = FakeMessage(value, offset_number=17)

    item = to_item(message, person_route)

    assert item.reject is None
    assert item.offset == 17
    assert item.message is message
    assert item.entry == (
        b'{"type":"person","action":"identify",'
        b'"identifiers":{"email":"ann@example.com"},"attributes":{"plan":"pro"}}'
    )


def test_to_item_event_without_id_gets_derived_id(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event without event_id is sent with the id derived from its coordinates."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": "login"})
    message = FakeMessage(
        value,
        topic_name="person-events",
        partition_number=5,
        offset_number=99,
        timestamp_ms=1_700_000_000_777,
    )

    item = to_item(message, event_route)

    assert item.entry is not None
    entry = json.loads(item.entry)
    expected_id = derive_event_id(
        Coordinates("person-events", 5, 99, 1_700_000_000_777)
    )
    assert entry == {
        "type": "person",
        "action": "event",
        "identifiers": {"email": "a@x.io"},
        "name": "login",
        "id": expected_id,
        "attributes": {},
    }


def test_to_item_same_event_twice_same_id(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """Replaying the same event record produces the same entry bytes."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": "login"})

    first = to_item(FakeMessage(value, topic_name="e", offset_number=3), event_route)
    second = to_item(FakeMessage(value, topic_name="e", offset_number=3), event_route)
    other = to_item(FakeMessage(value, topic_name="e", offset_number=4), event_route)

    assert first.entry == second.entry
    assert first.entry != other.entry


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\x02", "truncated_avro"),  # a 1-byte string with no byte after it
        (b"\x06a@x\x14", "bad_avro"),  # union branch 10 of a two-branch union
        (b"", "empty_value"),
    ],
)
def test_to_item_bad_bytes_reject_stage_decode(
    person_route: TopicRoute, value: bytes | None, reason: str
) -> None:
    """Bytes that do not decode become a reject at stage decode, not an error."""
    message = FakeMessage(value, offset_number=8)

    with capture_logs() as logs:
        item = to_item(message, person_route)

    assert item.entry is None
    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("decode", reason)
    assert item.offset == 8
    assert logs == [
        {
            "event": "record_rejected",
            "log_level": "debug",
            "topic": "persons",
            "partition": 0,
            "offset": 8,
            "stage": "decode",
            "reason": reason,
        }
    ]


@pytest.mark.parametrize("email", ["", "   "])
def test_to_item_blank_email_reject_stage_validate(
    person_schema: Any, person_route: TopicRoute, email: str
) -> None:
    """A person with a blank email becomes a validate reject naming the field."""
    value = encode(person_schema, {"person_email": email, "plan": "pro"})

    item = to_item(FakeMessage(value), person_route)

    assert item.entry is None
    assert item.reject is not None
    assert item.reject.stage == "validate"
    assert item.reject.reason == "missing_identifier"
    assert item.reject.field == "person_email"


def test_to_item_blank_event_name_reject_stage_validate(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event with a blank name becomes a validate reject naming event_name."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": " "})

    item = to_item(FakeMessage(value, topic_name="person-events"), event_route)

    assert item.reject is not None
    assert (item.reject.reason, item.reject.field) == (
        "missing_event_name",
        "event_name",
    )


def test_to_item_nan_value_reject_not_finite(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """An event whose value is NaN is rejected rather than sent as invalid JSON."""
    value = encode(
        event_schema,
        {"person_email": "a@x.io", "event_name": "buy", "value": float("nan")},
    )

    item = to_item(FakeMessage(value, topic_name="person-events"), event_route)

    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("validate", "not_finite")


def person_of_entry_size(schema: Any, size: int) -> bytes:
    """A person whose identify entry is exactly ``size`` bytes, its text spread
    over map attributes of at most 1,000 bytes (the attribute value limit)."""
    empty = {"person_email": "a@x.io", "attributes": {}}
    remaining = len(serialize(to_identify(empty)))
    attributes: dict[str, str] = {}
    while remaining < size:
        key = f"f{len(attributes):03d}"
        overhead = len(f'"{key}":""') + (1 if attributes else 0)
        room = size - remaining - overhead
        chunk = 1000 if room > 1000 + 40 else room
        attributes[key] = "x" * chunk
        remaining += overhead + chunk
    record = {"person_email": "a@x.io", "attributes": attributes}
    assert len(serialize(to_identify(record))) == size
    return encode(schema, record)


def test_to_item_entry_at_limit_is_sent(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """An entry of exactly 32,000 bytes is carried as an entry."""
    value = person_of_entry_size(person_schema, 32_000)

    item = to_item(FakeMessage(value), person_route)

    assert item.reject is None
    assert item.entry is not None
    assert len(item.entry) == 32_000


def test_to_item_entry_over_limit_reject_entry_too_large(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """An entry of 32,001 bytes is rejected at stage validate as entry_too_large."""
    value = person_of_entry_size(person_schema, 32_001)

    item = to_item(FakeMessage(value), person_route)

    assert item.entry is None
    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("validate", "entry_too_large")


# -- tombstones, identity, framing and routes from settings ------------------------


@pytest.mark.parametrize(
    ("policy", "key", "expected"),
    [
        (
            "delete",
            b"ann@example.com",
            b'{"type":"person","action":"delete",'
            b'"identifiers":{"email":"ann@example.com"}}',
        ),
        (
            "suppress",
            b"ann@example.com",
            b'{"type":"person","action":"suppress",'
            b'"identifiers":{"email":"ann@example.com"}}',
        ),
    ],
)
def test_to_item_person_tombstone_policy_builds_entry(
    person_schema: Any, policy: Any, key: bytes, expected: bytes
) -> None:
    """With delete or suppress, a person tombstone acts on the person its key names."""
    route = TopicRoute(Kind.PERSON, AvroDecoder(person_schema), tombstones=policy)

    item = to_item(FakeMessage(None, key_bytes=key), route)

    assert item.reject is None
    assert item.entry == expected


def test_to_item_person_tombstone_ignored_by_default_is_skipped(
    person_route: TopicRoute,
) -> None:
    """By default a person tombstone is skipped: no entry, no reject, logged DEBUG."""
    with capture_logs() as logs:
        item = to_item(FakeMessage(None, offset_number=4), person_route)

    assert (item.entry, item.reject, item.skipped) == (None, None, True)
    assert [(e["event"], e["log_level"]) for e in logs] == [
        ("tombstone_skipped", "debug")
    ]


@pytest.mark.parametrize("key", [None, b"", b"\xff"])
def test_to_item_person_tombstone_delete_without_key_rejected(
    person_schema: Any, key: bytes | None
) -> None:
    """A tombstone to delete a person must carry that person's key."""
    route = TopicRoute(Kind.PERSON, AvroDecoder(person_schema), tombstones="delete")

    item = to_item(FakeMessage(None, key_bytes=key), route)

    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason, item.reject.field) == (
        "validate",
        "missing_identifier",
        "key",
    )


@pytest.mark.parametrize("policy", ["ignore", "delete", "suppress"])
def test_to_item_event_tombstone_dead_lettered(event_schema: Any, policy: Any) -> None:
    """A tombstone on the event topic is refused, whatever the person policy."""
    route = TopicRoute(Kind.EVENT, AvroDecoder(event_schema), tombstones=policy)

    item = to_item(FakeMessage(None, topic_name="person-events"), route)

    assert item.reject is not None
    assert (item.reject.stage, item.reject.reason) == ("decode", "tombstone")
    assert not item.skipped


def test_to_item_two_events_for_one_person_without_id_distinct_ids(
    event_schema: Any, event_route: TopicRoute
) -> None:
    """Two id-less events of one person get two ids; replaying one repeats its id."""
    value = encode(event_schema, {"person_email": "a@x.io", "event_name": "login"})

    def entry_id(offset: int) -> str:
        message = FakeMessage(value, topic_name="e", offset_number=offset)
        item = to_item(message, event_route)
        assert item.entry is not None
        return str(json.loads(item.entry)["id"])

    first, second, replay = entry_id(10), entry_id(11), entry_id(10)

    assert first != second
    assert first == replay


def test_to_item_framed_value_decoded_by_registry_schema(person_schema: Any) -> None:
    """A framed value on a confluent route decodes with its writer schema."""
    registry = FakeRegistry({5: person_schema})
    route = TopicRoute(Kind.PERSON, FramedDecoder(person_schema, registry))
    value = encode_framed(5, person_schema, {"person_email": "a@x.io", "plan": "p"})

    item = to_item(FakeMessage(value), route)

    assert item.entry is not None
    assert json.loads(item.entry)["attributes"] == {"plan": "p"}


def test_to_item_registry_down_raises_transient_error(person_schema: Any) -> None:
    """An outage of the registry is not a reject: TransientError reaches the loop."""
    route = TopicRoute(
        Kind.PERSON, FramedDecoder(person_schema, FakeRegistry({}, down=True))
    )
    value = encode_framed(5, person_schema, {"person_email": "a@x.io"})

    with pytest.raises(TransientError):
        to_item(FakeMessage(value), route)


def test_to_item_limits_reject_names_every_problem(
    person_schema: Any, person_route: TopicRoute
) -> None:
    """A record breaking several limits gets one reject that lists all of them."""
    record = {
        "person_email": "a@x.io",
        "first_name": "é" * 501,
        "attributes": {"n" * 151: "v", "ok": "fine"},
    }

    item = to_item(FakeMessage(encode(person_schema, record)), person_route)

    assert item.reject is not None
    assert item.reject.reason == "attribute_name_too_long"
    assert "attribute_value_too_long" in item.reject.message
    assert "attributes.first_name" in item.reject.message


def routes_from(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, TopicRoute]:
    monkeypatch.chdir(ROOT)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_routes(load_settings())


def test_build_routes_defaults_plain_avro_by_email(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """By default both topics are plain Avro and people are keyed by email."""
    routes = routes_from(monkeypatch)

    person, event = routes["persons"], routes["person-events"]
    assert isinstance(person.decoder, AvroDecoder)
    assert isinstance(event.decoder, AvroDecoder)
    assert (person.kind, event.kind) == (Kind.PERSON, Kind.EVENT)
    assert person.mapping.identifier_type == "email"
    assert person.mapping.identifier_field == "person_email"
    assert person.tombstones == "ignore"


def test_build_routes_settings_choose_identity_framing_and_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Identity, framing and tombstone settings reach the topic routes."""
    routes = routes_from(
        monkeypatch,
        CIO_MAPPING__EVENT_IDENTIFIER="id",
        CIO_MAPPING__PERSON_IDENTIFIER="cio_id",
        CIO_MAPPING__PERSON_TOMBSTONES="suppress",
        CIO_SCHEMAS__PERSON_FORMAT="confluent",
        CIO_SCHEMAS__EVENT_FORMAT="auto",
        CIO_SCHEMAS__REGISTRY_URL="http://127.0.0.1:1",
    )

    person, event = routes["persons"], routes["person-events"]
    assert isinstance(person.decoder, FramedDecoder)
    assert isinstance(event.decoder, FramedDecoder)
    assert person.mapping.identifier_type == "cio_id"
    assert event.mapping.identifier_type == "id"
    assert person.tombstones == "suppress"


def test_build_routes_unknown_identifier_field_raises_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An identifier field the schema lacks stops start-up, naming the setting."""
    with pytest.raises(ConfigError) as caught:
        routes_from(monkeypatch, CIO_MAPPING__PERSON_IDENTIFIER_FIELD="person_id")

    assert "person_id" in str(caught.value)
    assert "CIO_MAPPING__PERSON_IDENTIFIER_FIELD" in str(caught.value)


def test_build_routes_auto_without_registry_reads_plain(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The auto format without a registry reads every value as plain Avro."""
    routes = routes_from(monkeypatch, CIO_SCHEMAS__PERSON_FORMAT="auto")

    assert isinstance(routes["persons"].decoder, AvroDecoder)


def test_build_routes_confluent_without_registry_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The confluent format needs a registry URL: a configuration error."""
    with pytest.raises(ConfigError) as caught:
        routes_from(monkeypatch, CIO_SCHEMAS__EVENT_FORMAT="confluent")

    assert "CIO_SCHEMAS__REGISTRY_URL" in str(caught.value)


OLD_PERSON = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [
        {"name": "person_email", "type": "string"},
        {"name": "nickname", "type": "string"},  # dropped: the reader lacks it
        {"name": "plan", "type": "string"},  # the reader's is ["null", "string"]
    ],
}


def write_schema(tmp_path: Path, schema: dict[str, Any]) -> str:
    path = tmp_path / "writer.avsc"
    path.write_text(json.dumps(schema))
    return str(path)


@pytest.mark.parametrize("framing", ["avro", "auto"])
def test_build_routes_plain_writer_schema_resolved_to_reader(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, framing: str
) -> None:
    """Plain values written with another schema are resolved to the reader:
    the writer's extra field is dropped, the reader's new fields default."""
    routes = routes_from(
        monkeypatch,
        CIO_SCHEMAS__PERSON_WRITER=write_schema(tmp_path, OLD_PERSON),
        CIO_SCHEMAS__PERSON_FORMAT=framing,
        CIO_SCHEMAS__REGISTRY_URL="http://127.0.0.1:1",
    )
    value = encode(
        parse_schema(OLD_PERSON),
        {"person_email": "ann@x.io", "nickname": "A", "plan": "pro"},
    )

    record = routes["persons"].decoder.decode(value)

    assert record["plan"] == "pro"
    assert record["first_name"] is None
    assert record["attributes"] == {}
    assert "nickname" not in record


@pytest.mark.parametrize(
    ("schema", "framing", "expected"),
    [
        ({**OLD_PERSON, "name": "Customer"}, "avro", "same full name"),
        (OLD_PERSON, "confluent", "unset CIO_SCHEMAS__PERSON_WRITER"),
        ({"type": "string"}, "avro", "must be an Avro record"),
        ({**OLD_PERSON, "fields": OLD_PERSON["fields"][1:]}, "avro",
         "cannot be read as the person schema"),  # no person_email
        ({**OLD_PERSON, "fields": [OLD_PERSON["fields"][0],
                                   {"name": "plan", "type": "long"}]}, "auto",
         "cannot be read as the person schema"),  # long is not null|string
    ],
)  # fmt: skip
def test_build_routes_unusable_writer_schema_refused(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    schema: dict[str, Any],
    framing: str,
    expected: str,
) -> None:
    """A writer schema that cannot apply stops start-up, saying why."""
    with pytest.raises(ConfigError) as caught:
        routes_from(
            monkeypatch,
            CIO_SCHEMAS__PERSON_WRITER=write_schema(tmp_path, schema),
            CIO_SCHEMAS__PERSON_FORMAT=framing,
            CIO_SCHEMAS__REGISTRY_URL="http://127.0.0.1:1",
        )

    assert expected in str(caught.value)


def test_build_routes_writer_schema_with_an_extra_union_branch_accepted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A writer whose values fit the reader only in part (a union branch the
    reader lacks) is accepted with a warning: records on the shared branch
    decode, the others are dead-lettered one by one."""
    plan = {"name": "plan", "type": ["null", "string", "long"]}
    writer = {**OLD_PERSON, "fields": [OLD_PERSON["fields"][0], plan]}

    with capture_logs() as logs:
        routes = routes_from(
            monkeypatch, CIO_SCHEMAS__PERSON_WRITER=write_schema(tmp_path, writer)
        )
    value = encode(parse_schema(writer), {"person_email": "a@x.io", "plan": "pro"})

    assert routes["persons"].decoder.decode(value)["plan"] == "pro"
    assert [e["event"] for e in logs] == ["writer_schema_partly_readable"]
