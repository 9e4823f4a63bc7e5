"""The worker's settings: one typed, frozen object, built once at start-up.

Values come from a TOML file (``config/worker.toml`` by default) and every one can
be overridden by an environment variable named ``CIO_<SECTION>__<KEY>``, for example
``CIO_KAFKA__BOOTSTRAP_SERVERS``. The Track API site id and key are read only from
``CIO_SITE_ID`` and ``CIO_API_KEY``: a config file that names them is refused, so
they never sit in a file that gets committed. Secrets are ``SecretStr`` and show
as ``**********`` in ``repr``, logs and ``config show``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from worker.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/worker.toml")
REGION_URLS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
# Customer.io documents "under 500 kb" per batch request; 500,000 bytes is the
# stricter of the two readings of "kb", so no request can be refused for size.
MAX_REQUEST_BYTES = 500_000
SECRET_KEYS = ("site_id", "api_key")
# librdkafka property names that carry credentials, masked when shown.
SECRET_PROPERTY_WORDS = ("password", "secret", "token", "key")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """Where the input topics are and how the consumer group reads them."""

    bootstrap_servers: str = Field(
        "127.0.0.1:19092", description="Kafka bootstrap servers, comma-separated."
    )
    group_id: str = Field("cio-worker", description="Consumer group id.")
    person_topic: str = Field("persons", description="Topic of person records.")
    event_topic: str = Field("person-events", description="Topic of event records.")
    dead_letter_topic: str = Field(
        "cio-dead-letters", description="Topic that receives rejected records."
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts."
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra librdkafka properties (security.protocol, sasl.*, ssl.*), "
            "passed through unchanged to the consumer and producer."
        ),
    )

    @model_validator(mode="after")
    def _topics_distinct(self) -> KafkaSettings:
        topics = [self.person_topic, self.event_topic, self.dead_letter_topic]
        if any(not t for t in topics) or len(set(topics)) != len(topics):
            raise ValueError(
                "person_topic, event_topic and dead_letter_topic must be set and "
                "all different"
            )
        return self


class TrackSettings(_Section):
    """How the Customer.io Track API is reached."""

    region: Literal["us", "eu"] = Field("us", description="Workspace region: us or eu.")
    base_url: str = Field(
        "",
        description=(
            "Overrides the region's host, for a proxy or the local simulator "
            "(e.g. http://127.0.0.1:8089)."
        ),
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect timeout.")
    read_timeout_s: float = Field(30.0, gt=0, description="Response read timeout.")
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Batches in flight at once, across partitions."
    )
    retry_max_wait_s: float = Field(
        30.0, gt=0, description="Longest wait between two retries of one request."
    )

    @property
    def url(self) -> str:
        """The Track API root to call, without a trailing slash."""
        return (self.base_url or REGION_URLS[self.region]).rstrip("/")


class BatchSettings(_Section):
    """When a partition's batch is sent."""

    max_entries: int = Field(
        1000, ge=1, le=10_000, description="Entries per request at most."
    )
    max_request_bytes: int = Field(
        MAX_REQUEST_BYTES,
        ge=40_000,
        le=MAX_REQUEST_BYTES,
        description="Request bodies stay under this many bytes (Customer.io: 500 KB).",
    )
    linger_ms: int = Field(
        200, ge=0, description="How long a partly filled batch waits for more records."
    )
    max_buffered_bytes_per_partition: int = Field(
        4_000_000,
        ge=MAX_REQUEST_BYTES,
        description="Bytes waiting in one partition before it is paused.",
    )


class SchemaSettings(_Section):
    """The Avro reader schemas; relative paths resolve from the working folder."""

    person: Path = Field(Path("schemas/person.avsc"), description="Person schema.")
    event: Path = Field(Path("schemas/person_event.avsc"), description="Event schema.")


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )


class Settings(BaseSettings):
    """Everything the worker needs, validated; build it with ``load_settings``."""

    model_config = SettingsConfigDict(
        env_prefix="CIO_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    site_id: SecretStr | None = Field(
        None, description="Customer.io Site ID (environment CIO_SITE_ID only)."
    )
    api_key: SecretStr | None = Field(
        None, description="Track API key (environment CIO_API_KEY only)."
    )
    kafka: KafkaSettings = KafkaSettings()
    track: TrackSettings = TrackSettings()
    batch: BatchSettings = BatchSettings()
    schemas: SchemaSettings = SchemaSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, which arrives as init arguments.
        return (env_settings, init_settings)

    def require_credentials(self) -> tuple[str, str]:
        """Return (site id, API key), or raise ConfigError naming what is missing."""
        missing = [
            f"CIO_{name.upper()}"
            for name in SECRET_KEYS
            if not getattr(self, name) or not getattr(self, name).get_secret_value()
        ]
        if missing:
            raise ConfigError(
                f"{' and '.join(missing)} not set: export the workspace's Site ID and "
                "Track API key (Customer.io: Workspace Settings > API and webhook "
                "credentials)"
            )
        assert self.site_id is not None
        assert self.api_key is not None
        return self.site_id.get_secret_value(), self.api_key.get_secret_value()

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, every secret masked."""
        data = self.model_dump(mode="json")
        for name in SECRET_KEYS:
            data[name] = "**********" if data[name] else None
        data["kafka"]["properties"] = mask_properties(self.kafka.properties)
        return data


def mask_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """Copy librdkafka properties with credential values masked."""
    return {
        key: "**********" if any(w in key for w in SECRET_PROPERTY_WORDS) else value
        for key, value in properties.items()
    }


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file (if any) and the environment into a Settings.

    Raises ConfigError with the file, the setting and what is wrong.
    """
    file_values = _read_toml(path)
    try:
        return Settings(**file_values)
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def _read_toml(path: Path | None) -> dict[str, Any]:
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for name in SECRET_KEYS:
        if name in values:
            raise ConfigError(
                f"config file {path} sets {name}; remove it and set "
                f"CIO_{name.upper()} in the environment instead"
            )
    return values


def kafka_client_config(settings: Settings, role: str) -> dict[str, Any]:
    """The librdkafka properties for one client; the only place they are built.

    ``role`` is "consumer" or "producer". Passed-through properties win over the
    defaults here, except the ones the delivery guarantees depend on.
    """
    kafka = settings.kafka
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": f"cio-worker-{role}",
    }
    config.update(kafka.properties)
    if role == "consumer":
        config.update(
            {
                "group.id": kafka.group_id,
                "auto.offset.reset": kafka.auto_offset_reset,
                "partition.assignment.strategy": "cooperative-sticky",
                "isolation.level": "read_committed",
                # Offsets move only after delivery; the worker commits them itself.
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
            }
        )
    else:
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "zstd",
                "linger.ms": 5,
            }
        )
    return config
