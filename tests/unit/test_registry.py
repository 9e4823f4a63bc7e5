"""Unit tests of worker.registry: writer schemas by id, cached, with retries."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from structlog.testing import capture_logs

from worker.errors import ConfigError, DecodeError, TransientError
from worker.registry import RETRY_ATTEMPTS, UNKNOWN_ID_TTL_S, SchemaRegistry
from worker.settings import load_settings

SCHEMA = {
    "type": "record",
    "name": "Person",
    "namespace": "io.cioworker",
    "fields": [{"name": "person_email", "type": "string"}],
}
URL = "http://127.0.0.1:8081"


class FakeGet:
    """Answers GETs from a script: (status, body) tuples or exceptions, in turn."""

    def __init__(self, *answers: tuple[int, Any] | Exception) -> None:
        self.answers = list(answers)
        self.urls: list[str] = []

    def __call__(self, url: str) -> tuple[int, bytes]:
        self.urls.append(url)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return status, body


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry(get: FakeGet, clock: Clock | None = None) -> SchemaRegistry:
    return SchemaRegistry(URL + "/", get, sleep=lambda _: None, clock=clock or Clock())


def found(schema: Any = SCHEMA) -> tuple[int, Any]:
    return 200, {"schema": json.dumps(schema)}


def test_writer_schema_fetched_once_per_id() -> None:
    """An id's schema is fetched on first use and served from the cache after."""
    get = FakeGet(found())
    schemas = registry(get)

    first = schemas.writer_schema(7)
    second = schemas.writer_schema(7)

    assert first is second
    assert first["name"] == "io.cioworker.Person"
    assert get.urls == [f"{URL}/schemas/ids/7"]


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ((404, {"error_code": 40403, "message": "not found"}), "unknown_schema_id"),
        ((200, {"schema": "{}", "schemaType": "PROTOBUF"}), "not_avro_schema"),
        ((200, {"schema": '"string"', "schemaType": "JSON"}), "not_avro_schema"),
        ((200, {"schema": "not json"}), "bad_writer_schema"),
        ((200, {"schema": '{"type": "record"}'}), "bad_writer_schema"),
        ((200, {"schema": '{"type": "nosuch"}'}), "bad_writer_schema"),
        (
            (200, {"schema": json.dumps(SCHEMA), "references": [{"name": "x"}]}),
            "bad_schema_reference",
        ),
    ],
)  # fmt: skip
def test_writer_schema_bad_answer_raises_decode_error(
    answer: tuple[int, Any], reason: str
) -> None:
    """Answers that say the record is unreadable are bad data, not an outage."""
    with pytest.raises(DecodeError) as caught:
        registry(FakeGet(answer)).writer_schema(9)

    assert caught.value.reason == reason
    assert caught.value.stage == "decode"
    assert "9" in caught.value.message


@pytest.mark.parametrize(
    "failure",
    [
        ConnectionRefusedError("refused"),
        TimeoutError("timed out"),
        OSError("no route"),
        (500, b"oops"),
        (503, b""),
        (429, b""),
        (401, b""),
        (200, b"<html>proxy</html>"),
        (200, {"no": "schema"}),
        (200, {"schema": 42}),
    ],
)
def test_writer_schema_registry_down_raises_transient_after_retries(
    failure: tuple[int, Any] | Exception,
) -> None:
    """Connection errors and non-404 failures are retried, then TransientError."""
    get = FakeGet(failure)

    with capture_logs() as logs, pytest.raises(TransientError) as caught:
        registry(get).writer_schema(3)

    assert len(get.urls) == RETRY_ATTEMPTS
    retries = [e for e in logs if e["event"] == "schema_registry_retry"]
    assert len(retries) == RETRY_ATTEMPTS - 1
    assert all(e["log_level"] == "warning" for e in retries)
    assert all(e["schema"] == "schema id 3" for e in retries)
    assert "schema id 3" in str(caught.value)
    assert not isinstance(caught.value, DecodeError)


def test_writer_schema_recovers_after_transient_failures() -> None:
    """A registry back within the retries answers and the schema is cached."""
    get = FakeGet(OSError("down"), (502, b""), found())
    schemas = registry(get)

    schema = schemas.writer_schema(5)

    assert schema["name"] == "io.cioworker.Person"
    assert len(get.urls) == 3
    schemas.writer_schema(5)
    assert len(get.urls) == 3


def test_writer_schema_backoff_is_bounded() -> None:
    """Every wait between attempts stays within the documented maximum."""
    waits: list[float] = []
    schemas = SchemaRegistry(URL, FakeGet(OSError("down")), sleep=waits.append)

    with pytest.raises(TransientError):
        schemas.writer_schema(1)

    assert len(waits) == RETRY_ATTEMPTS - 1
    assert all(0 <= w <= 5.0 for w in waits)


def test_writer_schema_unknown_id_remembered_for_ttl() -> None:
    """A 404 is not asked again until the TTL passes, then it is."""
    clock = Clock()
    get = FakeGet((404, b"{}"), (404, b"{}"), found())
    schemas = registry(get, clock)

    for _ in range(3):
        with pytest.raises(DecodeError):
            schemas.writer_schema(11)
    assert len(get.urls) == 1

    clock.now += UNKNOWN_ID_TTL_S + 1
    with pytest.raises(DecodeError):
        schemas.writer_schema(11)
    assert len(get.urls) == 2


def test_writer_schema_refusal_raised_afresh_each_time() -> None:
    """A cached refusal is a new exception each time, so tracebacks never pile up."""
    schemas = registry(FakeGet((200, {"schema": "{", "schemaType": "AVRO"})))

    with pytest.raises(DecodeError) as first:
        schemas.writer_schema(2)
    with pytest.raises(DecodeError) as second:
        schemas.writer_schema(2)

    assert first.value is not second.value
    assert first.value.reason == second.value.reason == "bad_writer_schema"


# -- the registry settings -----------------------------------------------------------


def test_settings_registry_password_from_environment_masked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The registry password comes from the environment and is shown masked."""
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_URL", URL)
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_USERNAME", "reader")
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_PASSWORD", "s3cret-pw")

    settings = load_settings(_empty_config(tmp_path))

    password = settings.schemas.registry_password
    assert password is not None
    assert password.get_secret_value() == "s3cret-pw"
    shown = json.dumps(settings.redacted()) + repr(settings)
    assert "s3cret-pw" not in shown
    assert settings.redacted()["schemas"]["registry_username"] == "reader"


def test_settings_registry_password_in_file_refused(tmp_path: Path) -> None:
    """A config file that holds the registry password is refused."""
    path = tmp_path / "worker.toml"
    path.write_text(
        f'[schemas]\nregistry_url = "{URL}"\nregistry_password = "s3cret-pw"\n'
    )

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert "CIO_SCHEMAS__REGISTRY_PASSWORD" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://user:pw@127.0.0.1:8081", "must not hold credentials"),
        ("ftp://127.0.0.1", "http:// or https://"),
        ("127.0.0.1:8081", "http:// or https://"),
    ],
)
def test_settings_bad_registry_url_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, url: str, message: str
) -> None:
    """A registry URL must be http(s) and carry no credentials."""
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_URL", url)

    with pytest.raises(ConfigError) as caught:
        load_settings(_empty_config(tmp_path))

    assert message in str(caught.value)


def _empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text("")
    return path


class RoutedGet:
    """Answers GETs by path; a path missing from the routes answers 404."""

    def __init__(self, routes: dict[str, tuple[int, Any] | Exception]) -> None:
        self.routes = routes
        self.urls: list[str] = []

    def __call__(self, url: str) -> tuple[int, bytes]:
        self.urls.append(url)
        answer = self.routes.get(url.removeprefix(URL), (404, {"error_code": 40401}))
        if isinstance(answer, Exception):
            raise answer
        return answer[0], json.dumps(answer[1]).encode()


COUNTRY = {"type": "enum", "name": "io.geo.Country", "symbols": ["NO", "SE"]}
ADDRESS = {
    "type": "record",
    "name": "io.geo.Address",
    "fields": [{"name": "city", "type": "string"},
               {"name": "country", "type": "io.geo.Country"}],
}  # fmt: skip
WITH_ADDRESS = {
    "type": "record",
    "name": "io.cioworker.Person",
    "fields": [{"name": "person_email", "type": "string"},
               {"name": "home", "type": "io.geo.Address"},
               {"name": "work", "type": ["null", "io.geo.Address"]}],
}  # fmt: skip


def referring(schema: Any, *refs: tuple[str, str, int]) -> tuple[int, Any]:
    references = [{"name": n, "subject": s, "version": v} for n, s, v in refs]
    return 200, {"schema": json.dumps(schema), "references": references}


def test_writer_schema_references_fetched_deepest_first_and_decode() -> None:
    """Named types from other subjects are fetched, references of references
    too, and a record written with them decodes."""
    get = RoutedGet({
        "/schemas/ids/4": referring(WITH_ADDRESS, ("io.geo.Address", "geo address", 2)),
        "/subjects/geo%20address/versions/2": referring(
            ADDRESS, ("io.geo.Country", "country", 1)
        ),
        "/subjects/country/versions/1": referring(COUNTRY),
    })  # fmt: skip
    value = {"person_email": "a@x.io", "home": {"city": "Oslo", "country": "NO"},
             "work": {"city": "Lund", "country": "SE"}}  # fmt: skip
    inline = {**WITH_ADDRESS, "fields": [
        WITH_ADDRESS["fields"][0],
        {"name": "home", "type": {**ADDRESS, "fields": [
            ADDRESS["fields"][0], {"name": "country", "type": COUNTRY}]}},
        {"name": "work", "type": ["null", "io.geo.Address"]}]}  # fmt: skip
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(inline), value)
    buffer.seek(0)

    writer = registry(get).writer_schema(4)  # type: ignore[arg-type]

    assert fastavro.schemaless_reader(buffer, writer, None) == value
    buffer.seek(0)
    # a reader where home is optional: the writer's named type must resolve
    # against a union, which fastavro does only with the type written in full
    optional_home = {"name": "home", "type": ["null", inline["fields"][1]["type"]]}
    reader = {**inline, "fields": [inline["fields"][0], optional_home,
                                   inline["fields"][2]]}  # fmt: skip
    resolved = fastavro.schemaless_reader(buffer, writer, fastavro.parse_schema(reader))
    assert resolved == value
    assert [url.removeprefix(URL) for url in get.urls] == [
        "/schemas/ids/4",
        "/subjects/geo%20address/versions/2",
        "/subjects/country/versions/1",
    ]


def test_writer_schema_reference_shared_or_cyclic_fetched_once() -> None:
    """A subject version referred to twice (or in a cycle) is fetched once."""
    get = RoutedGet({
        "/schemas/ids/4": referring(
            WITH_ADDRESS,
            ("io.geo.Address", "address", 1),
            ("io.geo.Country", "country", 1),
        ),
        "/subjects/address/versions/1": referring(
            ADDRESS, ("io.geo.Country", "country", 1), ("x", "address", 1)
        ),
        "/subjects/country/versions/1": referring(COUNTRY),
    })  # fmt: skip

    registry(get).writer_schema(4)  # type: ignore[arg-type]

    assert len(get.urls) == 3


@pytest.mark.parametrize(
    ("routes", "reason"),
    [
        ({"/schemas/ids/4": referring(WITH_ADDRESS, ("io.geo.Address", "gone", 3))},
         "unknown_schema_reference"),
        ({"/schemas/ids/4": referring(WITH_ADDRESS, ("io.geo.Address", "a", 1)),
          "/subjects/a/versions/1": (200, {"schema": "{}", "schemaType": "JSON"})},
         "not_avro_schema"),
        ({"/schemas/ids/4": referring(WITH_ADDRESS, ("io.geo.Address", "a", 1)),
          "/subjects/a/versions/1": referring(ADDRESS)},  # Country never defined
         "bad_writer_schema"),
        ({"/schemas/ids/4": (200, {"schema": json.dumps(WITH_ADDRESS),
                                   "references": [{"subject": "a", "version": "1"}]})},
         "bad_schema_reference"),
    ],
)  # fmt: skip
def test_writer_schema_bad_reference_is_bad_data(
    routes: dict[str, tuple[int, Any]], reason: str
) -> None:
    """A reference the registry lacks, or that does not parse, refuses the record."""
    with pytest.raises(DecodeError) as caught:
        registry(RoutedGet(routes)).writer_schema(4)  # type: ignore[arg-type]

    assert caught.value.reason == reason
    assert "schema id 4" in caught.value.message


def test_writer_schema_reference_outage_is_transient() -> None:
    """A registry that fails while fetching a reference is an outage, not bad data."""
    get = RoutedGet({
        "/schemas/ids/4": referring(WITH_ADDRESS, ("io.geo.Address", "a", 1)),
        "/subjects/a/versions/1": (503, {}),
    })  # fmt: skip

    with pytest.raises(TransientError) as caught:
        registry(get).writer_schema(4)  # type: ignore[arg-type]

    assert "subject 'a' version 1" in str(caught.value)
    assert len(get.urls) == 1 + RETRY_ATTEMPTS
