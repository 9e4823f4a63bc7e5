"""Unit tests of worker.settings: file, environment, validation and secrets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import (
    Settings,
    kafka_client_config,
    load_settings,
    mask_properties,
)

# Fake credentials, distinctive enough to search for in anything shown.
SITE_SECRET = "site-0f3c9a-secret"  # noqa: S105
KEY_SECRET = "key-77d1e2-secret"  # noqa: S105
SASL_SECRET = "sasl-pw-5b8e41"  # noqa: S105


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


@pytest.fixture
def no_default_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run from a folder without config/worker.toml."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIO_SITE_ID", SITE_SECRET)
    monkeypatch.setenv("CIO_API_KEY", KEY_SECRET)


@pytest.mark.usefixtures("no_default_file")
def test_load_settings_no_file_uses_defaults() -> None:
    """Without a file or environment the documented defaults apply."""
    settings = load_settings()

    assert settings.site_id is None
    assert settings.api_key is None
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert settings.kafka.group_id == "cio-worker"
    assert (
        settings.kafka.person_topic,
        settings.kafka.event_topic,
        settings.kafka.dead_letter_topic,
    ) == ("persons", "person-events", "cio-dead-letters")
    assert settings.kafka.properties == {}
    assert settings.track.region == "us"
    assert settings.track.url == "https://track.customer.io"
    assert settings.batch.max_entries == 1000
    assert settings.batch.max_request_bytes == 500_000
    assert settings.batch.linger_ms == 200
    assert settings.log.level == "INFO"


def test_load_settings_file_values_are_used(tmp_path: Path) -> None:
    """Values in the TOML file replace the defaults they name."""
    path = write(
        tmp_path,
        '[kafka]\ngroup_id = "g-file"\n'
        '[kafka.properties]\n"security.protocol" = "SASL_SSL"\n'
        '[track]\nregion = "eu"\n'
        "[batch]\nmax_entries = 50\nlinger_ms = 0\n"
        '[log]\nlevel = "DEBUG"\n',
    )

    settings = load_settings(path)

    assert settings.kafka.group_id == "g-file"
    assert settings.kafka.properties == {"security.protocol": "SASL_SSL"}
    assert settings.track.region == "eu"
    assert settings.track.url == "https://track-eu.customer.io"
    assert settings.batch.max_entries == 50
    assert settings.batch.linger_ms == 0
    assert settings.log.level == "DEBUG"
    assert settings.kafka.bootstrap_servers == "127.0.0.1:19092"


def test_load_settings_environment_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An environment variable wins over the file; other file values stay."""
    path = write(
        tmp_path, '[kafka]\nbootstrap_servers = "file:9092"\ngroup_id = "g-file"\n'
    )
    monkeypatch.setenv("CIO_KAFKA__BOOTSTRAP_SERVERS", "env-1:9092,env-2:9092")
    monkeypatch.setenv("CIO_BATCH__MAX_ENTRIES", "7")

    settings = load_settings(path)

    assert settings.kafka.bootstrap_servers == "env-1:9092,env-2:9092"
    assert settings.kafka.group_id == "g-file"
    assert settings.batch.max_entries == 7


@pytest.mark.usefixtures("no_default_file")
def test_load_settings_properties_from_environment_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CIO_KAFKA__PROPERTIES is read as a JSON object of librdkafka properties."""
    properties = {"security.protocol": "SASL_SSL", "sasl.password": SASL_SECRET}
    monkeypatch.setenv("CIO_KAFKA__PROPERTIES", json.dumps(properties))

    settings = load_settings()

    assert settings.kafka.properties == properties


@pytest.mark.parametrize(
    ("text", "variable"),
    [
        (f'site_id = "{SITE_SECRET}"\n', "CIO_SITE_ID"),
        (f'api_key = "{KEY_SECRET}"\n', "CIO_API_KEY"),
        (f'api_key = "{KEY_SECRET}"\n[kafka]\ngroup_id = "g"\n', "CIO_API_KEY"),
        (f'[track]\napi_key = "{KEY_SECRET}"\n', "CIO_API_KEY"),
        (f'[kafka]\nsite_id = "{SITE_SECRET}"\n', "CIO_SITE_ID"),
    ],
)
def test_load_settings_file_with_credentials_refused(
    tmp_path: Path, text: str, variable: str
) -> None:
    """A file naming site_id or api_key is refused, pointing at the variable."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert variable in message
    assert str(path) in message
    assert SITE_SECRET not in message
    assert KEY_SECRET not in message


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("[batch]\nmax_entries = 0\n", "batch.max_entries"),
        ("[batch]\nmax_entries = 10001\n", "batch.max_entries"),
        ('[track]\nregion = "ap"\n', "track.region"),
        ("[batch]\nmax_request_bytes = 600000\n", "batch.max_request_bytes"),
        ("[batch]\nmax_request_bytes = 39999\n", "batch.max_request_bytes"),
        ('[kafka]\nevent_topic = "persons"\n', "event_topic"),
        ('[kafka]\ndead_letter_topic = "person-events"\n', "dead_letter_topic"),
        ('[kafka]\nperson_topic = ""\n', "person_topic"),
        ("[track]\nmax_concurrency = 0\n", "track.max_concurrency"),
        ("[track]\nread_timeout_s = 0\n", "track.read_timeout_s"),
        ('[kafka]\nauto_offset_reset = "smallest"\n', "kafka.auto_offset_reset"),
        ('[log]\nlevel = "TRACE"\n', "log.level"),
        ("[batch]\nunknown = 1\n", "batch.unknown"),
    ],
)
def test_load_settings_invalid_value_names_setting(
    tmp_path: Path, text: str, setting: str
) -> None:
    """An invalid value raises ConfigError naming the setting at fault."""
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert setting in str(caught.value)


@pytest.mark.usefixtures("no_default_file")
def test_load_settings_invalid_environment_value_names_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An invalid value from the environment names the setting and the variable."""
    monkeypatch.setenv("CIO_BATCH__MAX_ENTRIES", "0")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert "batch.max_entries (CIO_BATCH__MAX_ENTRIES)" in str(caught.value)


@pytest.mark.usefixtures("no_default_file")
@pytest.mark.parametrize(
    "value",
    ['{"sasl.password": "hunter2-secret",', "security.protocol=SSL", "[1, 2"],
)
def test_load_settings_invalid_json_in_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A table-valued variable that is not JSON is named, its value never shown."""
    monkeypatch.setenv("CIO_KAFKA__PROPERTIES", value)

    with pytest.raises(ConfigError) as caught:
        load_settings()

    message = str(caught.value)
    assert "CIO_KAFKA__PROPERTIES is not valid JSON" in message
    assert "hunter2" not in message


def test_load_settings_explicit_missing_file_raises(tmp_path: Path) -> None:
    """A --config path that does not exist is an error, not silently ignored."""
    path = tmp_path / "absent.toml"

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)


def test_load_settings_invalid_toml_raises(tmp_path: Path) -> None:
    """A file that is not TOML raises ConfigError naming the file."""
    path = write(tmp_path, "[kafka\ngroup_id = \n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert "not valid TOML" in str(caught.value)


def test_load_settings_non_utf8_file_raises_config_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 (so not TOML) raises ConfigError."""
    path = tmp_path / "worker.toml"
    path.write_bytes(b'[kafka]\ngroup_id = "caf\xe9"\n')

    with pytest.raises(ConfigError):
        load_settings(path)


@pytest.mark.parametrize(
    ("site", "key", "missing"),
    [
        (None, None, "CIO_SITE_ID and CIO_API_KEY"),
        (SITE_SECRET, None, "CIO_API_KEY"),
        (None, KEY_SECRET, "CIO_SITE_ID"),
        ("", KEY_SECRET, "CIO_SITE_ID"),
        (SITE_SECRET, "", "CIO_API_KEY"),
    ],
)
@pytest.mark.usefixtures("no_default_file")
def test_require_credentials_missing_names_variables(
    monkeypatch: pytest.MonkeyPatch, site: str | None, key: str | None, missing: str
) -> None:
    """Missing or empty credentials raise ConfigError naming each variable."""
    if site is not None:
        monkeypatch.setenv("CIO_SITE_ID", site)
    if key is not None:
        monkeypatch.setenv("CIO_API_KEY", key)
    settings = load_settings()

    with pytest.raises(ConfigError) as caught:
        settings.require_credentials()

    message = str(caught.value)
    assert message.startswith(f"{missing} not set")
    assert SITE_SECRET not in message
    assert KEY_SECRET not in message


@pytest.mark.usefixtures("no_default_file", "credentials")
def test_require_credentials_both_set_returns_them() -> None:
    """With both variables set the plain site id and key are returned."""
    settings = load_settings()

    pair = settings.require_credentials()

    assert pair == (SITE_SECRET, KEY_SECRET)


@pytest.fixture
def secret_settings(
    no_default_file: None, credentials: None, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    properties = {
        "security.protocol": "SASL_SSL",
        "sasl.username": "cio-worker",
        "sasl.password": SASL_SECRET,
    }
    monkeypatch.setenv("CIO_KAFKA__PROPERTIES", json.dumps(properties))
    return load_settings()


def test_redacted_hides_every_secret(secret_settings: Settings) -> None:
    """The redacted settings mask the site id, API key and Kafka password."""
    data = secret_settings.redacted()

    text = json.dumps(data)
    assert data["site_id"] == "**********"
    assert data["api_key"] == "**********"
    assert data["kafka"]["properties"] == {
        "security.protocol": "SASL_SSL",
        "sasl.username": "cio-worker",
        "sasl.password": "**********",
    }
    for secret in (SITE_SECRET, KEY_SECRET, SASL_SECRET):
        assert secret not in text


@pytest.mark.usefixtures("no_default_file")
def test_redacted_without_credentials_shows_none() -> None:
    """Unset credentials show as null, not as a mask suggesting they are set."""
    data = load_settings().redacted()

    assert data["site_id"] is None
    assert data["api_key"] is None


def test_repr_hides_credentials(secret_settings: Settings) -> None:
    """Neither repr nor str of the settings shows the site id or API key."""
    shown = repr(secret_settings) + str(secret_settings)

    assert SITE_SECRET not in shown
    assert KEY_SECRET not in shown


def test_repr_hides_kafka_password(secret_settings: Settings) -> None:
    """repr and str of the settings do not show a Kafka password."""
    shown = repr(secret_settings) + str(secret_settings)

    assert SASL_SECRET not in shown


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        ("sasl.password", True),
        ("ssl.key.password", True),
        ("ssl.keystore.password", True),
        ("sasl.oauthbearer.client.secret", True),
        ("ssl.key.pem", True),
        ("sasl.oauthbearer.token.endpoint.url", True),
        ("sasl.username", False),
        ("security.protocol", False),
        ("sasl.mechanisms", False),
    ],
)
def test_mask_properties_masks_credential_names(key: str, masked: bool) -> None:
    """Properties named like password, secret, token or key are masked."""
    properties = {key: "value-1234"}

    shown = mask_properties(properties)

    assert shown == {key: "**********" if masked else "value-1234"}


@pytest.fixture
def overriding_settings(
    no_default_file: None, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    properties = {
        "enable.auto.commit": "true",
        "enable.auto.offset.store": "true",
        "isolation.level": "read_uncommitted",
        "group.id": "hijack",
        "enable.idempotence": "false",
        "acks": "1",
        "client.id": "custom-client",
        "sasl.username": "cio-worker",
    }
    monkeypatch.setenv("CIO_KAFKA__PROPERTIES", json.dumps(properties))
    monkeypatch.setenv("CIO_KAFKA__GROUP_ID", "g-env")
    return load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("enable.auto.commit", False),
        ("enable.auto.offset.store", False),
        ("isolation.level", "read_committed"),
        ("group.id", "g-env"),
        ("auto.offset.reset", "earliest"),
        ("enable.partition.eof", True),
        ("sasl.username", "cio-worker"),
        ("client.id", "custom-client"),
        ("bootstrap.servers", "127.0.0.1:19092"),
    ],
)
def test_kafka_client_config_consumer_guarantees_not_overridable(
    overriding_settings: Settings, name: str, value: object
) -> None:
    """Consumer properties the delivery guarantees need win over pass-throughs."""
    config = kafka_client_config(overriding_settings, "consumer")

    assert config[name] == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("enable.idempotence", True),
        ("acks", "all"),
        ("sasl.username", "cio-worker"),
        ("client.id", "custom-client"),
    ],
)
def test_kafka_client_config_producer_guarantees_not_overridable(
    overriding_settings: Settings, name: str, value: object
) -> None:
    """Producer idempotence and acks=all cannot be weakened by pass-throughs."""
    config = kafka_client_config(overriding_settings, "producer")

    assert config[name] == value


@pytest.mark.usefixtures("no_default_file")
def test_kafka_client_config_roles_differ() -> None:
    """Consumer-only keys stay out of the producer config and vice versa."""
    settings = load_settings()

    consumer = kafka_client_config(settings, "consumer")
    producer = kafka_client_config(settings, "producer")

    assert consumer["client.id"] == "cio-worker-consumer"
    assert producer["client.id"] == "cio-worker-producer"
    assert "group.id" not in producer
    assert "enable.idempotence" not in consumer


@pytest.mark.usefixtures("no_default_file")
def test_kafka_client_config_consumer_prefetch_bounded_and_overridable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The consumer reads ahead a bounded amount by default; a passed-through
    property changes it, and the producer does not get these keys."""
    monkeypatch.setenv("CIO_KAFKA__PROPERTIES", '{"fetch.max.bytes": "52428800"}')
    settings = load_settings()

    consumer = kafka_client_config(settings, "consumer")
    producer = kafka_client_config(settings, "producer")

    assert consumer["max.partition.fetch.bytes"] == 262144
    assert consumer["queued.max.messages.kbytes"] == 16384
    assert consumer["fetch.max.bytes"] == "52428800"
    assert "max.partition.fetch.bytes" not in producer


def test_settings_frozen_assignment_refused(tmp_path: Path) -> None:
    """Settings cannot be changed after they are built."""
    settings = load_settings(write(tmp_path, ""))

    with pytest.raises(ValueError, match="frozen"):
        settings.batch.max_entries = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("notaurl", "http:// or https://"),
        ("ftp://127.0.0.1:1", "http:// or https://"),
        ("http://site:key@127.0.0.1:1", "must not carry credentials"),
    ],
)
def test_load_settings_unusable_base_url_raises_config_error(
    monkeypatch: pytest.MonkeyPatch, base_url: str, message: str
) -> None:
    """A Track API URL that cannot work, or carries credentials, stops start-up."""
    monkeypatch.setenv("CIO_TRACK__BASE_URL", base_url)

    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_kafka_client_config_prefetch_bounded_without_long_backoff(
    no_default_file: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumer's bounded prefetch refills within milliseconds (librdkafka
    would wait 1 s once a partition's prefetch is full), and a passed-through
    property still wins."""
    config = kafka_client_config(load_settings(), "consumer")
    assert config["queued.max.messages.kbytes"] == 16384
    assert config["fetch.queue.backoff.ms"] == 10

    monkeypatch.setenv(
        "CIO_KAFKA__PROPERTIES", json.dumps({"fetch.queue.backoff.ms": "100"})
    )
    config = kafka_client_config(load_settings(), "consumer")
    assert config["fetch.queue.backoff.ms"] == "100"
