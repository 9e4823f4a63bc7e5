"""``cio-worker check``: is everything the worker needs there and usable?

Each check reaches one dependency with the configured settings and returns one
line: ``ok``, ``WARN`` (works, but something looks wrong), ``skip`` (not
configured) or ``FAIL`` with what to fix. Besides the dependencies, a sample of
the newest input records is decoded with the configured schemas, because a
schema file that parses can still be the wrong one. The checks run side by side, each in
a daemon thread with its own deadline, so an unreachable host fails in seconds
and a hung library call cannot hold the command. Nothing is written except one
small object in the archive bucket, removed again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from worker.avro import load_schema
from worker.errors import ConfigError, CredentialsError, TransientError
from worker.settings import Settings, kafka_client_config
from worker.track import TrackClient

# Each bound keeps its check well inside CHECK_TIMEOUT_S, the hard deadline.
KAFKA_TIMEOUT_S = 10.0
HTTP_CONNECT_TIMEOUT_S = 5.0
HTTP_READ_TIMEOUT_S = 10.0
CHECK_TIMEOUT_S = 20.0
CHECK_OBJECT_FOLDER = "_cio-check"
SAMPLE_PER_PARTITION = 20
SAMPLE_TIMEOUT_S = 5.0

OK, WARN, SKIP, FAIL = "ok", "WARN", "skip", "FAIL"


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: str  # ok, WARN, skip or FAIL
    message: str

    @property
    def passed(self) -> bool:
        return self.status != FAIL


Check = Callable[[Settings], CheckResult]


def check_kafka(settings: Settings) -> CheckResult:
    """The brokers answer and the person, event and dead-letter topics exist."""
    kafka = settings.kafka
    errors: list[str] = []
    config = {
        **kafka_client_config(settings, "admin"),
        "error_cb": lambda error: errors.append(error.str()),
        "log_level": 0,  # the error callback carries what matters; no stderr noise
    }
    admin = AdminClient(config)
    try:
        metadata = admin.list_topics(timeout=KAFKA_TIMEOUT_S)
    except KafkaException as exc:
        admin.poll(0)  # serves the error callback: the connection's own error
        error = exc.args[0]
        detail = errors[0] if errors else getattr(error, "str", lambda: error)()
        return CheckResult(
            "kafka",
            FAIL,
            f"cannot reach {kafka.bootstrap_servers} within {KAFKA_TIMEOUT_S:.0f} s "
            f"({detail}): check CIO_KAFKA__BOOTSTRAP_SERVERS and, for a secured "
            "cluster, CIO_KAFKA__PROPERTIES",
        )
    wanted = [kafka.person_topic, kafka.event_topic, kafka.dead_letter_topic]
    missing = [topic for topic in wanted if topic not in metadata.topics]
    if missing:
        return CheckResult(
            "kafka",
            FAIL,
            f"reached {kafka.bootstrap_servers}, but topics {', '.join(missing)} are "
            "missing: create them or set CIO_KAFKA__PERSON_TOPIC, "
            "CIO_KAFKA__EVENT_TOPIC or CIO_KAFKA__DEAD_LETTER_TOPIC",
        )
    return CheckResult(
        "kafka",
        OK,
        f"reached {kafka.bootstrap_servers}; topics {', '.join(wanted)} present",
    )


def check_track(settings: Settings) -> CheckResult:
    """The Track API accepts the site id and key, in the configured region."""
    try:
        site_id, api_key = settings.require_credentials()
    except ConfigError as exc:
        return CheckResult("track", FAIL, str(exc))
    url = settings.track.url
    client = TrackClient(
        url,
        site_id,
        api_key,
        connect_timeout_s=HTTP_CONNECT_TIMEOUT_S,
        read_timeout_s=HTTP_READ_TIMEOUT_S,
        pool_size=1,
    )
    try:
        answer = client.region()
    except CredentialsError as exc:
        return CheckResult("track", FAIL, f"{url}: {exc}")
    except TransientError as exc:
        return CheckResult(
            "track",
            FAIL,
            f"{url}: {exc}; check CIO_TRACK__BASE_URL or CIO_TRACK__REGION and the "
            "network",
        )
    finally:
        client.close()
    return _region_result(url, settings.track.region, answer)


def _region_result(url: str, configured: str, answer: dict[str, Any]) -> CheckResult:
    region = str(answer.get("region") or "")
    if region and region != configured:
        return CheckResult(
            "track",
            WARN,
            f"credentials accepted by {url}, but the workspace is in region "
            f"{region} and [track] region is {configured}: set "
            f"CIO_TRACK__REGION={region}",
        )
    return CheckResult(
        "track", OK, f"credentials accepted by {url}; workspace region {region or '?'}"
    )


def check_schemas(settings: Settings) -> CheckResult:
    """Both Avro schema files, and the writer schemas if set, exist and parse."""
    schemas = settings.schemas
    named = {
        "CIO_SCHEMAS__PERSON": schemas.person,
        "CIO_SCHEMAS__EVENT": schemas.event,
        "CIO_SCHEMAS__PERSON_WRITER": schemas.person_writer,
        "CIO_SCHEMAS__EVENT_WRITER": schemas.event_writer,
    }
    paths = {setting: path for setting, path in named.items() if path is not None}
    try:
        for setting, path in paths.items():
            load_schema(path, setting)
    except ConfigError as exc:
        return CheckResult("schemas", FAIL, str(exc))
    listed = ", ".join(str(path) for path in paths.values())
    return CheckResult("schemas", OK, f"{listed} parse")


def check_records(settings: Settings) -> CheckResult:
    """The newest records of the person and event topics decode and map.

    A schema file that parses but is not the one producers write with makes
    every record a dead letter; reading a sample shows that before a run. Up to
    ``SAMPLE_PER_PARTITION`` records from the end of each partition are read
    without joining the group, so no offset moves.
    """
    from worker.pipeline import build_routes, to_item  # settings are valid here

    try:
        routes = build_routes(settings)
    except ConfigError as exc:
        return CheckResult("records", FAIL, str(exc))
    try:
        sample = _sample(settings, list(routes))
    except KafkaException as exc:
        return CheckResult(
            "records", FAIL, f"cannot read the input topics: {exc.args[0]}"
        )
    lines, failed = [], False
    for topic, messages in sample.items():
        if not messages:
            lines.append(f"{topic}: no records to sample")
            continue
        try:
            items = [to_item(message, routes[topic]) for message in messages]
        except TransientError as exc:
            return CheckResult("records", FAIL, f"{topic}: {exc}")
        refused = Counter(i.reject.reason for i in items if i.reject is not None)
        decoded = sum(
            1 for i in items if i.reject is None or i.reject.stage != "decode"
        )
        if not decoded:
            failed = True
            reason, _ = refused.most_common(1)[0]
            lines.append(
                f"{topic}: none of the {len(items)} newest records decode "
                f"({reason}); the schema settings for this topic (CIO_SCHEMAS__"
                "PERSON or __EVENT, *_WRITER, *_FORMAT) do not match what "
                "producers write"
            )
        elif refused:
            listed = ", ".join(f"{n} {r}" for r, n in refused.most_common(3))
            if len(refused) > 3:
                listed += f" and {len(refused) - 3} more reasons"
            lines.append(
                f"{topic}: {len(items) - refused.total()} of the {len(items)} "
                f"newest records map; refused: {listed}"
            )
        else:
            lines.append(f"{topic}: the {len(items)} newest records map")
    status = FAIL if failed else WARN if "refused" in " ".join(lines) else OK
    return CheckResult("records", status, "; ".join(lines))


def _sample(settings: Settings, topics: list[str]) -> dict[str, list[Any]]:
    """Up to SAMPLE_PER_PARTITION of the newest records of each topic's partitions."""
    consumer = Consumer(
        {
            **kafka_client_config(settings, "admin"),
            "group.id": f"{settings.kafka.group_id}.check",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "log_level": 0,
        }
    )
    sample: dict[str, list[Any]] = {topic: [] for topic in topics}
    try:
        assignment = []
        metadata = consumer.list_topics(timeout=KAFKA_TIMEOUT_S)
        for topic in topics:
            partitions = (
                metadata.topics[topic].partitions if topic in metadata.topics else {}
            )
            for partition in partitions:
                tp = TopicPartition(topic, partition)
                low, high = consumer.get_watermark_offsets(tp, timeout=KAFKA_TIMEOUT_S)
                if high > low:
                    tp.offset = max(low, high - SAMPLE_PER_PARTITION)
                    assignment.append(tp)
        consumer.assign(assignment)
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        at_end = 0
        while at_end < len(assignment) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    at_end += 1
                    continue
                raise KafkaException(error)
            source = message.topic()
            if source in sample:
                sample[source].append(message)
    finally:
        consumer.close()
    return sample


def check_archive(settings: Settings) -> CheckResult:
    """The archive bucket takes a write, a list and a delete of a check object."""
    from worker.s3 import ArchiveError, ObjectStore  # boto3 only when needed

    archive = settings.archive
    if not archive.bucket:
        return CheckResult("s3", SKIP, "no archive bucket set (CIO_ARCHIVE__BUCKET)")
    store = ObjectStore(
        archive,
        connect_timeout_s=HTTP_CONNECT_TIMEOUT_S,
        read_timeout_s=HTTP_READ_TIMEOUT_S,
        put_attempts=1,
    )
    folder = "/".join(p for p in (archive.prefix.strip("/"), CHECK_OBJECT_FOLDER) if p)
    key = f"{folder}/{uuid.uuid4().hex}.txt"
    try:
        store.put(key, b"cio-worker check\n")
        listed = key in store.list_keys(key)
        store.delete(key)
    except ArchiveError as exc:
        return CheckResult("s3", FAIL, str(exc))
    if not listed:
        return CheckResult(
            "s3",
            FAIL,
            f"{store.where} stored {key} but did not list it: check the bucket's "
            "s3:ListBucket permission for the prefix",
        )
    return CheckResult(
        "s3", OK, f"{store.where} accepts put, list and delete under {folder}/"
    )


DEFAULT_CHECKS: tuple[Check, ...] = (
    check_kafka,
    check_track,
    check_schemas,
    check_records,
    check_archive,
)
CHECK_NAMES: dict[Check, str] = {
    check_kafka: "kafka",
    check_track: "track",
    check_schemas: "schemas",
    check_records: "records",
    check_archive: "s3",
}


def run_checks(
    settings: Settings,
    checks: Sequence[Check] = DEFAULT_CHECKS,
    timeout_s: float = CHECK_TIMEOUT_S,
) -> list[CheckResult]:
    """Run ``checks`` side by side; each has ``timeout_s`` to answer."""
    results: dict[int, CheckResult] = {}
    threads = []
    for index, check in enumerate(checks):
        thread = threading.Thread(
            target=_capture,
            args=(index, check, settings, results),
            name=f"cio-check-{index}",
            daemon=True,  # a hung check must not keep the process alive
        )
        thread.start()
        threads.append(thread)
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [
        results.get(index)
        or CheckResult(
            _name(check),
            FAIL,
            f"no answer within {timeout_s:.0f} s: the host is unreachable or hangs; "
            "check the address settings and the network",
        )
        for index, check in enumerate(checks)
    ]


def format_results(results: Sequence[CheckResult]) -> str:
    """One aligned line per result."""
    width = max((len(r.name) for r in results), default=0)
    return "\n".join(f"{r.status:<4} {r.name:<{width}}  {r.message}" for r in results)


def _capture(
    index: int, check: Check, settings: Settings, results: dict[int, CheckResult]
) -> None:
    try:
        results[index] = check(settings)
    except Exception as exc:  # a bug or an unexpected library error: still a line
        results[index] = CheckResult(_name(check), FAIL, f"{type(exc).__name__}: {exc}")


def _name(check: Check) -> str:
    return CHECK_NAMES.get(check) or str(getattr(check, "__name__", "check"))
