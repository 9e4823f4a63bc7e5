"""The S3 archive end to end: worker dead letters, the archiver, moto over HTTP."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from structlog.testing import capture_logs

from tests.integration.cli import run_cli
from tests.integration.conftest import ROOT, Topics
from tests.integration.kafka_tools import committed_offsets, end_offsets, read_all
from tests.integration.s3_server import (
    SECRET_ACCESS_KEY,
    MotoServer,
    free_port,
    read_archive,
    s3_client,
)
from tests.unit.fakes import FakeMessage
from worker.archive import Archiver, archive_group_id
from worker.avro import encode, load_schema
from worker.loop import Worker
from worker.rejects import (
    DEAD_LETTER_MAX_RECORD_BYTES,
    Reject,
    StoredDeadLetter,
    assemble,
    dead_letter_records,
    header_map,
)
from worker.s3 import ObjectStore
from worker.sandbox.sample import Sample, SampleRecord, produce
from worker.settings import load_settings

pytestmark = pytest.mark.integration

PERSON_SCHEMA = load_schema(ROOT / "schemas" / "person.avsc")
EVENT_SCHEMA = load_schema(ROOT / "schemas" / "person_event.avsc")
KEY_PATTERN = re.compile(
    r"rejects/(?P<topic>[^/]+)/dt=\d{4}-\d{2}-\d{2}/"
    r"part-0000-(?P<first>\d{20})-(?P<last>\d{20})\.jsonl\.gz"
)
# Kafka's own default for a topic (1 MB + overhead), not the test broker's 10 MB.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = "1048588"


def _sample_with_refusals() -> Sample:
    """A few good records and one refusal from each stage."""
    sample = Sample()
    for i in range(20):
        email = f"p{i}@example.com"
        person = encode(PERSON_SCHEMA, {"person_email": email, "plan": "free"})
        sample.records.append(SampleRecord("person", email.encode(), person))
    refused = [
        SampleRecord(
            "event",
            b"r1",
            encode(EVENT_SCHEMA, {"person_email": "r1@x.io", "event_name": "n" * 101}),
        ),
        SampleRecord("event", b"r2", b"\x00\x01garbage"),
        SampleRecord("person", b"r3", encode(PERSON_SCHEMA, {"person_email": ""})),
    ]
    sample.records.extend(refused)
    return sample


def _write_dead_letters(bootstrap: str, topic: str, count: int) -> list[bytes]:
    """Dead letters as the worker writes them, straight to the topic; returns
    their values."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    reject = Reject("validate", "missing_identifier", "no email", "person_email")
    values = []
    for offset in range(count):
        value = os.urandom(40)
        source = FakeMessage(
            value, "src.persons", 1, offset, f"k{offset}".encode(), [("h", b"v")]
        )
        for record in dead_letter_records(source, reject):
            producer.produce(topic, record.value, record.key, headers=record.headers)
        values.append(value)
    assert producer.flush(30) == 0
    return values


def _last_offset(key: str) -> int:
    """The last dead-letter offset an archive object's key names."""
    match = KEY_PATTERN.fullmatch(key)
    assert match is not None, key
    return int(match["last"])


def _lines(objects: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [line for key in sorted(objects) for line in objects[key]]


def _archiver_committed(bootstrap: str, group: str, topic: str) -> TopicPartition:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (committed,) = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return committed
    finally:
        consumer.close()


def _commit_group(bootstrap: str, group: str, topic: str, offset: int) -> None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        consumer.close()


def test_archive_holds_every_dead_letter_of_a_worker_run(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    """Every record the worker dead-lettered is one line in S3 with the same
    bytes, reasons and coordinates, under the documented names; the archiver's
    offsets reach the end."""
    sample = _sample_with_refusals()
    produce(kafka_bootstrap, sample, topics.person, topics.event)
    worker_counters = Worker(load_settings(), until_caught_up=True).run()
    dead = {m.offset(): m for m in read_all(kafka_bootstrap, topics.dead_letter)}

    counters = Archiver(load_settings(), until_caught_up=True).run()

    objects = read_archive(s3_endpoint, s3_bucket)
    lines = _lines(objects)
    assert len(lines) == len(dead) == worker_counters.rejected == 3
    assert counters.archived == 3
    for key in objects:
        match = KEY_PATTERN.fullmatch(key)
        assert match, key
        assert match["topic"] in (topics.person, topics.event)
    for line in lines:
        message = dead[line["dead_letter"]["offset"]]
        headers = header_map(message.headers())
        assert base64.b64decode(line["value"]) == message.value()
        assert base64.b64decode(line["key"]) == message.key()
        assert line["reject"]["stage"] == headers["stage"]
        assert line["reject"]["reason"] == headers["reason"]
        assert line["reject"]["message"] == headers["message"]
        assert line["source"]["topic"] == headers["source.topic"]
        assert line["source"]["offset"] == int(headers["source.offset"])
        assert line["headers"] == []
        assert (line["decoded"] is None) == (line["reject"]["stage"] == "decode")
    group = archive_group_id(load_settings())
    assert committed_offsets(kafka_bootstrap, group, topics.dead_letter) == end_offsets(
        kafka_bootstrap, topics.dead_letter
    )


def test_archive_run_twice_over_the_same_range_adds_no_object(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Archiving the same dead letters again (offsets reset) writes the same
    names with the same bytes: no new object, no duplicated line."""
    values = _write_dead_letters(kafka_bootstrap, topics.dead_letter, 10)
    monkeypatch.setenv("CIO_ARCHIVE__MAX_RECORDS", "3")
    Archiver(load_settings(), until_caught_up=True).run()
    first = read_archive(s3_endpoint, s3_bucket)
    group = archive_group_id(load_settings())

    _commit_group(kafka_bootstrap, group, topics.dead_letter, 0)
    Archiver(load_settings(), until_caught_up=True).run()

    second = read_archive(s3_endpoint, s3_bucket)
    assert second == first
    assert len(first) == 4  # offsets 0-2, 3-5, 6-8, 9
    offsets = [line["dead_letter"]["offset"] for line in _lines(second)]
    assert offsets == list(range(10))
    assert [base64.b64decode(line["value"]) for line in _lines(second)] == values


class _Crash(BaseException):
    """Stands in for a kill between the upload and the commit."""


def test_archive_crash_after_upload_redoes_the_same_range(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash after storing a range and before committing it leaves the cut in
    the commit metadata; the next run, even with other flush settings, stores
    exactly that range again (overwriting it) and then the rest."""
    _write_dead_letters(kafka_bootstrap, topics.dead_letter, 10)
    monkeypatch.setenv("CIO_ARCHIVE__MAX_RECORDS", "4")
    real_commit = Archiver._commit

    def crash_on_final_commit(
        self: Archiver, consumer: Any, p: int, o: int, m: str
    ) -> None:
        if not m:
            raise _Crash
        real_commit(self, consumer, p, o, m)

    monkeypatch.setattr(Archiver, "_commit", crash_on_final_commit)
    with pytest.raises(_Crash):
        Archiver(load_settings(), until_caught_up=True).run()
    monkeypatch.setattr(Archiver, "_commit", real_commit)
    group = archive_group_id(load_settings())
    committed = _archiver_committed(kafka_bootstrap, group, topics.dead_letter)
    after_crash = read_archive(s3_endpoint, s3_bucket)

    monkeypatch.setenv("CIO_ARCHIVE__MAX_RECORDS", "1000")
    Archiver(load_settings(), until_caught_up=True).run()

    assert (committed.offset, committed.metadata) == (0, "cio.archive.cut=3")
    assert [_last_offset(k) for k in after_crash] == [3]
    final = read_archive(s3_endpoint, s3_bucket)
    assert sorted(_last_offset(k) for k in final) == [3, 9]
    offsets = [line["dead_letter"]["offset"] for line in _lines(final)]
    assert offsets == list(range(10))


def _big_person_topic(
    bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str]:
    """A person topic taking 10 MB records and a dead-letter topic with Kafka's
    default 1 MB limit, both set in the worker's environment."""
    person_topic = f"{topics.group}.big-persons"
    dead_letter_topic = f"{topics.group}.small-dlq"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    limits = {
        person_topic: "10485760",
        dead_letter_topic: KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    }
    created = admin.create_topics(
        [NewTopic(name, 1, 1, config={"max.message.bytes": limit})
         for name, limit in limits.items()]
    )  # fmt: skip
    for future in created.values():
        future.result()
    monkeypatch.setenv("CIO_KAFKA__PERSON_TOPIC", person_topic)
    monkeypatch.setenv("CIO_KAFKA__DEAD_LETTER_TOPIC", dead_letter_topic)
    return person_topic, dead_letter_topic


def test_oversize_record_survives_dead_lettering_and_archiving_byte_exact(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 3 MB record refused by the worker reaches a dead-letter topic with
    Kafka's default 1 MB limit as chunks, and the archive holds it byte-exact."""
    person_topic, dead_letter_topic = _big_person_topic(
        kafka_bootstrap, topics, monkeypatch
    )
    name = "".join(random.Random(3).choices(string.ascii_letters, k=3_000_000))
    value = encode(
        PERSON_SCHEMA, {"person_email": "big@example.com", "first_name": name}
    )
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_000_000}
    )
    producer.produce(person_topic, value, b"big@example.com")
    assert producer.flush(30) == 0

    counters = Worker(load_settings(), until_caught_up=True).run()
    chunks = read_all(kafka_bootstrap, dead_letter_topic)
    Archiver(load_settings(), until_caught_up=True).run()

    assert counters.rejected == 1
    assert len(chunks) == 4
    assert all(len(m.value()) < DEAD_LETTER_MAX_RECORD_BYTES for m in chunks)
    (joined,) = assemble([StoredDeadLetter.from_message(m) for m in chunks])
    assert joined.value == value
    (line,) = _lines(read_archive(s3_endpoint, s3_bucket))
    assert base64.b64decode(line["value"]) == value
    assert line["value_sha256"] == hashlib.sha256(value).hexdigest()
    assert line["dead_letter"]["offsets"] == [0, 1, 2, 3]
    assert line["decoded"]["first_name"] == name
    assert line["fragment"] is None


def test_record_with_huge_headers_survives_as_an_envelope(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused record whose headers alone exceed the dead-letter topic's
    1 MB limit is dead-lettered as envelope chunks, the worker goes on, and
    the archive holds its key, headers and value byte-exact."""
    person_topic, dead_letter_topic = _big_person_topic(
        kafka_bootstrap, topics, monkeypatch
    )
    trace = random.Random(5).randbytes(1_500_000)
    refused = encode(PERSON_SCHEMA, {"person_email": "", "first_name": "No"})
    good = encode(PERSON_SCHEMA, {"person_email": "ok@example.com"})
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 10_000_000}
    )
    producer.produce(person_topic, refused, b"k-1", headers=[("trace", trace)])
    producer.produce(person_topic, good, b"ok@example.com")
    assert producer.flush(30) == 0

    counters = Worker(load_settings(), until_caught_up=True).run()
    chunks = read_all(kafka_bootstrap, dead_letter_topic)
    Archiver(load_settings(), until_caught_up=True).run()

    assert (counters.rejected, counters.delivered) == (1, 1)
    assert len(chunks) == 3  # 2 MB of base64 envelope in slices under 900 KB
    assert all(dict(m.headers())["cio.chunk.envelope"] == b"true" for m in chunks)
    (joined,) = assemble([StoredDeadLetter.from_message(m) for m in chunks])
    assert (joined.key, joined.headers, joined.value) == (
        b"k-1",
        [("trace", trace)],
        refused,
    )
    (line,) = _lines(read_archive(s3_endpoint, s3_bucket))
    assert base64.b64decode(line["key"]) == b"k-1"
    assert line["headers"] == [["trace", base64.b64encode(trace).decode()]]
    assert base64.b64decode(line["value"]) == refused
    assert line["reject"]["reason"] == "missing_identifier"
    assert line["fragment"] is None


def test_archive_pauses_during_an_s3_outage_then_archives_everything(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With S3 unreachable the archiver logs the failure, commits nothing and
    keeps going; once S3 answers it stores every dead letter and commits."""
    values = _write_dead_letters(kafka_bootstrap, topics.dead_letter, 5)
    port = free_port()
    monkeypatch.setenv("CIO_ARCHIVE__ENDPOINT_URL", f"http://127.0.0.1:{port}")
    settings = load_settings()
    store = ObjectStore(settings.archive, put_attempts=2)
    archiver = Archiver(settings, until_caught_up=True, store=store)
    thread = threading.Thread(target=archiver.run, daemon=True)
    group = archive_group_id(settings)

    with capture_logs() as logs:
        thread.start()
        deadline = time.monotonic() + 60
        while not any(e["event"] == "archive_paused" for e in logs):
            assert time.monotonic() < deadline, "no failed upload was reported"
            time.sleep(0.1)
        committed_during = _archiver_committed(
            kafka_bootstrap, group, topics.dead_letter
        )
        server = MotoServer(port).start()
        try:
            s3_client(server.url).create_bucket(Bucket=settings.archive.bucket)
            thread.join(90)
            archived = read_archive(server.url, settings.archive.bucket)
        finally:
            server.stop()

    assert not thread.is_alive()
    assert committed_during.offset == 0  # the intent only: nothing archived yet
    assert committed_during.metadata == "cio.archive.cut=4"
    assert [base64.b64decode(line["value"]) for line in _lines(archived)] == values
    assert committed_offsets(kafka_bootstrap, group, topics.dead_letter) == {0: 5}
    paused = [e for e in logs if e["event"] == "archive_paused"]
    assert "cannot reach" in paused[0]["error"]
    assert "CIO_ARCHIVE__ENDPOINT_URL" in paused[0]["error"]


def test_archive_with_role_arn_assumes_the_role(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With role_arn set the archiver works with the role's temporary
    credentials from STS."""
    _write_dead_letters(kafka_bootstrap, topics.dead_letter, 2)
    monkeypatch.setenv(
        "CIO_ARCHIVE__ROLE_ARN", "arn:aws:iam::123456789012:role/archiver"
    )
    monkeypatch.setenv("CIO_ARCHIVE__STS_ENDPOINT_URL", s3_endpoint)

    with capture_logs() as logs:
        counters = Archiver(load_settings(), until_caught_up=True).run()

    assert counters.archived == 2
    assumed = [e for e in logs if e["event"] == "archive_role_assumed"]
    assert assumed[0]["role_arn"] == "arn:aws:iam::123456789012:role/archiver"
    assert len(_lines(read_archive(s3_endpoint, s3_bucket))) == 2


def test_archive_command_never_shows_the_secret_key(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    """`cio-worker archive` exits 0 and its output, at DEBUG, never holds the
    secret access key; nor does `config show`."""
    _write_dead_letters(kafka_bootstrap, topics.dead_letter, 3)
    env = {**archive_env, "CIO_LOG__LEVEL": "DEBUG"}

    result = run_cli(env, "archive", "--until-caught-up")
    shown = run_cli(env, "config", "show", timeout_s=60)

    assert result.returncode == 0, result.stderr
    assert '"archived": 3' in result.stdout
    assert '"archive_range_stored"' in result.stderr
    for output in (result.stdout, result.stderr, shown.stdout, shown.stderr):
        assert SECRET_ACCESS_KEY not in output
    assert '"secret_access_key": "**********"' in shown.stdout
    assert len(_lines(read_archive(s3_endpoint, s3_bucket))) == 3


def test_run_with_archive_enabled_runs_the_archiver_beside_it(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
) -> None:
    """`cio-worker run` with [archive] enabled starts and stops the archiver
    thread and still exits 0."""
    produce(kafka_bootstrap, _sample_with_refusals(), topics.person, topics.event)

    env = {**archive_env, "CIO_ARCHIVE__ENABLED": "true"}
    result = run_cli(env, "run", "--until-caught-up")

    assert result.returncode == 0, result.stderr
    assert '"archiver_started"' in result.stderr
    assert '"archiver_stopped"' in result.stderr
    assert '"rejected": 3' in result.stdout


def test_archive_command_stores_its_buffer_on_sigterm(
    archive_env: dict[str, str],
    topics: Topics,
    kafka_bootstrap: str,
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """SIGTERM before any flush trigger fired: the archiver stores what it has
    read, commits it and exits 0."""
    values = _write_dead_letters(kafka_bootstrap, topics.dead_letter, 3)
    log_path = tmp_path / "archive.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker", "archive"],
            env={**os.environ, **archive_env, "CIO_ARCHIVE__MAX_AGE_S": "600"},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        deadline = time.monotonic() + 60
        while '"partitions_assigned"' not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the archiver never got its partition"
            time.sleep(0.1)
        time.sleep(2)  # let it read the three dead letters
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=60)

    assert process.returncode == 0, log_path.read_text()
    assert '"archived": 3' in stdout
    lines = _lines(read_archive(s3_endpoint, s3_bucket))
    assert [base64.b64decode(line["value"]) for line in lines] == values
    group = archive_group_id(load_settings())
    assert committed_offsets(kafka_bootstrap, group, topics.dead_letter) == {0: 3}
