"""The worker's settings: one typed, frozen object, built once at start-up.

Values come from a TOML file (``config/worker.toml`` by default) and every one can
be overridden by an environment variable named ``CIO_<SECTION>__<KEY>``, for example
``CIO_KAFKA__BOOTSTRAP_SERVERS``. The Track API site id and key are read only from
``CIO_SITE_ID`` and ``CIO_API_KEY``: a config file that names them is refused, so
they never sit in a file that gets committed. Secrets are ``SecretStr`` and show
as ``**********`` in ``repr``, logs and ``config show``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from worker.errors import ConfigError
from worker.logs import KAFKA_LOGGER

DEFAULT_CONFIG_PATH = Path("config/worker.toml")
REGION_URLS = {"us": "https://track.customer.io", "eu": "https://track-eu.customer.io"}
# Customer.io documents "under 500 kb" per batch request; 500,000 bytes is the
# stricter of the two readings of "kb", so no request can be refused for size.
MAX_REQUEST_BYTES = 500_000
SECRET_KEYS = ("site_id", "api_key")
# Secrets inside sections, also accepted only from the environment.
SECTION_SECRET_KEYS = {
    "archive": ("access_key_id", "secret_access_key"),
    "schemas": ("registry_password",),
}
# librdkafka property names that carry credentials, masked when shown.
SECRET_PROPERTY_WORDS = ("password", "secret", "token", "key")
PLAIN_SASL_PROPERTIES = frozenset(
    {"sasl.mechanism", "sasl.mechanisms", "sasl.username", "sasl.kerberos.service.name"}
)
REGISTRY_PASSWORD_ENV = "CIO_SCHEMAS__REGISTRY_PASSWORD"  # noqa: S105 (a name)


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
    group_instance_id: str = Field(
        "",
        description=(
            "Static membership (group.instance.id): a replica restarted with the same "
            "id takes its partitions back without a rebalance. Unique per replica."
        ),
    )
    max_poll_interval_ms: int = Field(
        300_000,
        ge=10_000,
        description="librdkafka max.poll.interval.ms; the loop polls every few ms "
        "even while batches wait on retries.",
    )
    session_timeout_ms: int = Field(
        45_000,
        ge=6_000,
        description="How long the group waits for a silent member before rebalancing.",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts."
    )
    properties: dict[str, str] = Field(
        default_factory=dict,
        repr=False,  # may hold sasl.password and the like
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
        30.0, gt=0, description="Longest backoff between two retries of one request."
    )
    retry_after_max_s: float = Field(
        120.0, gt=0, description="Longest wait a Retry-After header can impose."
    )
    rate_limit_rps: float = Field(
        100.0,
        gt=0,
        description=(
            "Requests per second for the whole workspace; each replica takes a share "
            "in proportion to the partitions it owns."
        ),
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, how long batches in flight may take before they "
        "are abandoned (not committed, so re-sent after restart).",
    )

    @model_validator(mode="after")
    def _base_url_usable(self) -> TrackSettings:
        if not self.base_url:
            return self
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url {self.base_url!r} must be an http:// or https:// URL "
                "with a host, such as https://track.customer.io"
            )
        if parts.username or parts.password:
            raise ValueError(
                "base_url must not carry credentials; the site id and API key come "
                "from CIO_SITE_ID and CIO_API_KEY"
            )
        return self

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
    max_buffered_bytes: int = Field(
        64_000_000,
        ge=MAX_REQUEST_BYTES,
        description="Bytes waiting across all partitions before every one is paused.",
    )
    max_buffered_bytes_per_partition: int = Field(
        2_000_000,
        ge=MAX_REQUEST_BYTES,
        description="Bytes waiting in one partition before it is paused.",
    )


class StateSettings(_Section):
    """Dedupe state on a compacted topic, and the transactions that write it."""

    topic: str = Field(
        "", description='Compacted state topic; empty: "<group_id>.state".'
    )
    person_dedupe: Literal["off", "unchanged", "changed_attributes"] = Field(
        "unchanged",
        description=(
            "off; unchanged: skip a person whose attributes equal the last ones "
            "delivered; changed_attributes: send only the attributes that changed."
        ),
    )
    event_dedupe: Literal["off", "id"] = Field(
        "id", description="off; id: skip an event whose id was already delivered."
    )
    event_retention_hours: float = Field(
        168.0, gt=0, description="How long a delivered event id is remembered."
    )
    transactional_id: str = Field(
        "",
        description=(
            "Stable per-replica identity for transactional.id (e.g. the pod name); "
            "empty: group_instance_id if set, else unique per process. A stable id "
            "lets a restarted replica abort its killed predecessor's transaction "
            "at once."
        ),
    )
    transaction_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description=(
            "Kafka transaction.timeout.ms: the longest a killed replica's open "
            "transaction can hold up readers when its id is not stable."
        ),
    )


class SchemaSettings(_Section):
    """The Avro reader schemas; relative paths resolve from the working folder."""

    person: Path = Field(Path("schemas/person.avsc"), description="Person schema.")
    event: Path = Field(Path("schemas/person_event.avsc"), description="Event schema.")
    person_format: Literal["avro", "confluent", "auto"] = Field(
        "avro",
        description=(
            "Person topic values: avro (plain Avro), confluent (schema registry "
            "framing) or auto (framed when the first byte is 0 and a registry is set)."
        ),
    )
    event_format: Literal["avro", "confluent", "auto"] = Field(
        "avro", description="Event topic values: avro, confluent or auto."
    )
    person_writer: Path | None = Field(
        None,
        description=(
            "Schema producers write plain Avro person values with, when it is not "
            "the person schema itself; values are resolved from it to the person "
            "schema. Unset: plain values are read with the person schema."
        ),
    )
    event_writer: Path | None = Field(
        None, description="The same, for plain Avro values on the event topic."
    )
    registry_url: str = Field(
        "",
        description=(
            "Schema registry root URL for confluent and auto topics "
            "(e.g. http://127.0.0.1:8081)."
        ),
    )
    registry_username: str = Field(
        "", description="Schema registry basic-auth user; empty: no auth."
    )
    registry_password: SecretStr | None = Field(
        None,
        description=(
            "Schema registry basic-auth password "
            "(environment CIO_SCHEMAS__REGISTRY_PASSWORD only)."
        ),
    )
    registry_timeout_s: float = Field(
        5.0, gt=0, description="Schema registry request timeout."
    )

    @model_validator(mode="before")
    @classmethod
    def _password_from_environment(cls, values: Any) -> Any:
        # The file arrives merged with the environment: a password the
        # environment does not hold came from the file, which is refused.
        if isinstance(values, dict) and values.get("registry_password"):
            names = {name.upper() for name in os.environ}
            if REGISTRY_PASSWORD_ENV not in names:
                raise ValueError(
                    "registry_password may only come from the environment: "
                    f"remove it from the file and set {REGISTRY_PASSWORD_ENV}"
                )
        return values

    @model_validator(mode="after")
    def _writer_for_plain_values(self) -> SchemaSettings:
        for kind in ("person", "event"):
            if getattr(self, f"{kind}_writer") and (
                getattr(self, f"{kind}_format") == "confluent"
            ):
                raise ValueError(
                    f"{kind}_writer applies to plain Avro values, but "
                    f"{kind}_format is confluent, where every value names its "
                    f"writer schema: unset CIO_SCHEMAS__{kind.upper()}_WRITER"
                )
        return self

    @model_validator(mode="after")
    def _registry_usable(self) -> SchemaSettings:
        if "confluent" in (self.person_format, self.event_format) and not (
            self.registry_url
        ):
            raise ValueError(
                "format confluent needs registry_url (CIO_SCHEMAS__REGISTRY_URL)"
            )
        if self.registry_url:
            parts = urlsplit(self.registry_url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError("registry_url must be an http:// or https:// URL")
            if parts.username or parts.password:
                raise ValueError(
                    "registry_url must not hold credentials: set registry_username "
                    f"and {REGISTRY_PASSWORD_ENV}"
                )
        return self


class MappingSettings(_Section):
    """How records name their person, and what a person tombstone does."""

    person_identifier: Literal["email", "id", "cio_id"] = Field(
        "email", description="Identifier type of people on the person topic."
    )
    person_identifier_field: str = Field(
        "person_email",
        min_length=1,
        description="Person record field that holds the identifier.",
    )
    event_identifier: Literal["email", "id", "cio_id"] = Field(
        "email", description="Identifier type of people on the event topic."
    )
    event_identifier_field: str = Field(
        "person_email",
        min_length=1,
        description="Event record field that holds the identifier.",
    )
    person_tombstones: Literal["ignore", "delete", "suppress"] = Field(
        "ignore",
        description=(
            "A person record with a null value: ignore it, or delete or suppress "
            "the person its key names."
        ),
    )


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON otherwise."
    )


class MetricsSettings(_Section):
    """The HTTP server of ``cio-worker run``: /metrics, /healthz and /readyz.

    The host defaults to every interface because in a pod the kubelet probes and
    Prometheus reach the pod's own address, never its loopback; nothing secret is
    served. Tests bind 127.0.0.1 with port 0 (any free port).
    """

    host: str = Field(
        "0.0.0.0",
        min_length=1,
        description=(
            "Address of the metrics and health server; 127.0.0.1 keeps it on the "
            "machine."
        ),
    )
    port: int = Field(
        9108,
        ge=0,
        le=65_535,
        description="Port of /metrics, /healthz and /readyz; 0: any free port.",
    )
    liveness_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "/healthz answers 503 when the loop has not turned for this long; above "
            "the longest step that blocks it while healthy (start-up, a commit)."
        ),
    )


class ArchiveSettings(_Section):
    """The S3 archive of dead letters (``cio-worker archive``) and its access.

    Credentials: the access keys (environment only), else ``role_arn`` assumed
    through STS, else the default chain (instance profile, web identity).
    """

    enabled: bool = Field(
        False, description="Also run the archiver as a thread of `cio-worker run`."
    )
    bucket: str = Field("", description="S3 bucket of the archive; empty: none.")
    prefix: str = Field("cio-rejects", description="Key prefix of archive objects.")
    region: str = Field("us-east-1", description="The bucket's AWS region.")
    endpoint_url: str = Field(
        "", description="S3-compatible endpoint (MinIO, Ceph); empty: AWS S3."
    )
    access_key_id: SecretStr | None = Field(
        None, description="Access key id (environment CIO_ARCHIVE__ACCESS_KEY_ID only)."
    )
    secret_access_key: SecretStr | None = Field(
        None,
        description="Secret key (environment CIO_ARCHIVE__SECRET_ACCESS_KEY only).",
    )
    role_arn: str = Field(
        "", description="IAM role to assume through STS; empty: none."
    )
    role_session_name: str = Field(
        "cio-worker-archiver", description="STS session name when assuming role_arn."
    )
    sts_endpoint_url: str = Field(
        "", description="STS endpoint for role_arn; empty: AWS's regional STS."
    )
    group_id: str = Field(
        "", description='Archiver consumer group; empty: "<[kafka] group_id>-archiver".'
    )
    max_records: int = Field(
        10_000, ge=1, description="Dead letters per partition before a flush."
    )
    max_bytes: int = Field(
        64_000_000,
        ge=1_000_000,
        description="Buffered bytes per partition before a flush.",
    )
    max_age_s: float = Field(
        60.0, gt=0, description="Longest a dead letter waits in the buffer."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ArchiveSettings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "set both CIO_ARCHIVE__ACCESS_KEY_ID and "
                "CIO_ARCHIVE__SECRET_ACCESS_KEY, or neither"
            )
        if self.enabled and not self.bucket:
            raise ValueError("enabled needs a bucket: set CIO_ARCHIVE__BUCKET")
        return self


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
    state: StateSettings = StateSettings()
    schemas: SchemaSettings = SchemaSettings()
    mapping: MappingSettings = MappingSettings()
    log: LogSettings = LogSettings()
    archive: ArchiveSettings = ArchiveSettings()
    metrics: MetricsSettings = MetricsSettings()

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

    @property
    def state_topic(self) -> str:
        """The state topic's name, derived from the group id unless set."""
        return self.state.topic or f"{self.kafka.group_id}.state"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, every secret masked."""
        data = self.model_dump(mode="json")
        for name in SECRET_KEYS:
            data[name] = "**********" if data[name] else None
        data["kafka"]["properties"] = mask_properties(self.kafka.properties)
        return data


def mask_properties(properties: Mapping[str, str]) -> dict[str, str]:
    """Copy librdkafka properties with credential values masked: any name with
    a secret-sounding word, and every sasl.* value but a few plain ones (a
    sasl.jaas.config or sasl.oauthbearer.config holds credentials)."""
    return {
        key: "**********" if _is_secret_property(key) else value
        for key, value in properties.items()
    }


def _is_secret_property(key: str) -> bool:
    if any(word in key for word in SECRET_PROPERTY_WORDS):
        return True
    return key.startswith("sasl.") and key not in PLAIN_SASL_PROPERTIES


def load_settings(path: Path | None = None) -> Settings:
    """Read the TOML file (if any) and the environment into a Settings.

    Raises ConfigError with the file, the setting and what is wrong.
    """
    file_values = _read_toml(path)
    try:
        return Settings(**file_values)
    except SettingsError as exc:
        raise ConfigError(
            f"invalid settings in the environment: {_env_problem(exc)}"
        ) from None
    except PydanticValidationError as exc:
        problems = "; ".join(
            f"{_setting_name(err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from None


def _setting_name(loc: tuple[Any, ...]) -> str:
    """``section.key``, and the environment variable when it set the value."""
    dotted = ".".join(str(part) for part in loc)
    variable = "CIO_" + "__".join(str(part) for part in loc[:2]).upper()
    if variable in {name.upper() for name in os.environ}:
        return f"{dotted} ({variable})"
    return dotted


def _env_problem(error: SettingsError) -> str:
    """Name the variable behind an environment parsing error: pydantic-settings
    names only the section, while the culprit is a CIO_<SECTION>__<KEY> that
    holds invalid JSON (a table-valued setting such as CIO_KAFKA__PROPERTIES)."""
    found = re.search(r'field "(\w+)"', str(error))
    if found is None:
        return str(error)
    prefix = f"CIO_{found.group(1).upper()}__"
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(prefix):
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            if value.lstrip()[:1] in ("{", "[") or name.upper().endswith(
                "__PROPERTIES"
            ):
                return (
                    f"{name} is not valid JSON ({exc}); it takes a JSON object, "
                    """for example '{"security.protocol": "SASL_SSL"}'"""
                )
    return str(error)


def _read_toml(path: Path | None) -> dict[str, Any]:
    explicit = path is not None
    path = path or DEFAULT_CONFIG_PATH
    if not path.exists():
        if explicit:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for name in SECRET_KEYS:
        if name in values:
            raise ConfigError(
                f"config file {path} sets {name}; remove it and set "
                f"CIO_{name.upper()} in the environment instead"
            )
    for section, table in values.items():
        for name in SECRET_KEYS:
            if isinstance(table, dict) and name in table:
                raise ConfigError(
                    f"config file {path} sets [{section}] {name}; remove it and set "
                    f"CIO_{name.upper()} in the environment instead (it belongs to "
                    "no section and is never read from a file)"
                )
    for section, names in SECTION_SECRET_KEYS.items():
        table = values.get(section)
        for name in names:
            if isinstance(table, dict) and name in table:
                raise ConfigError(
                    f"config file {path} sets [{section}] {name}; remove it and set "
                    f"CIO_{section.upper()}__{name.upper()} in the environment instead"
                )
    return values


# How much the consumer reads ahead, which passed-through properties may change.
# librdkafka's defaults prefetch up to 1 MB per partition and 64 MB in all,
# far more than a worker that sends a few thousand records a second needs: these
# bound the prefetch (a 1,000,000-record backlog: peak RSS 353 MB with the
# defaults, 205 MB with these) while still reading several times faster than
# the Track API takes records. The worker's own buffers are capped separately
# ([batch] max_buffered_bytes).
CONSUMER_PREFETCH: dict[str, Any] = {
    "queued.max.messages.kbytes": 16384,
    "queued.min.messages": 2000,
    "max.partition.fetch.bytes": 262144,
    "fetch.max.bytes": 4194304,
    # A partition whose prefetch is full waits this long before it is fetched
    # again. librdkafka's default of 1 s, with the bounds above, held a plain
    # consumer of a backlog to under 6,000 records/s (300,000 records: 52 s,
    # against 1.5 s with 10 ms), far below what the worker delivers.
    "fetch.queue.backoff.ms": 10,
    # Ask for the group coordinator every 10 s (every 1 s while it is down)
    # instead of every 10 minutes, so a consumer whose coordinator moved or
    # restarted finds it again promptly and rejoins the group.
    "coordinator.query.interval.ms": 10000,
}


def kafka_client_config(
    settings: Settings, role: str, transactional_id: str = ""
) -> dict[str, Any]:
    """The librdkafka properties for one client; the only place they are built.

    ``role`` is "consumer", "producer" or "admin" (only the connection
    properties); a producer given a ``transactional_id``
    is transactional. Passed-through properties win over the defaults here,
    except the ones the delivery guarantees depend on.
    """
    kafka = settings.kafka
    config: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": f"cio-worker-{role}",
        "logger": KAFKA_LOGGER,  # the client's log lines as structured events
    }
    if role == "consumer":
        config.update(CONSUMER_PREFETCH)
    config.update(kafka.properties)
    if role == "consumer":
        if kafka.group_instance_id:
            config["group.instance.id"] = kafka.group_instance_id
        config.update(
            {
                "group.id": kafka.group_id,
                "auto.offset.reset": kafka.auto_offset_reset,
                "partition.assignment.strategy": "cooperative-sticky",
                "session.timeout.ms": kafka.session_timeout_ms,
                "max.poll.interval.ms": kafka.max_poll_interval_ms,
                "isolation.level": "read_committed",
                # Offsets move only after delivery; the worker commits them itself.
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
            }
        )
    elif role == "producer":
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "zstd",
                "linger.ms": 5,
            }
        )
        if transactional_id:
            config["transactional.id"] = transactional_id
            config["transaction.timeout.ms"] = settings.state.transaction_timeout_ms
    return config
