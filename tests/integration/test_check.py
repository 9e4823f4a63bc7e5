"""`cio-worker check` against the real broker, the simulator and moto."""

from __future__ import annotations

import time

import pytest

from tests.integration.cli import run_cli
from tests.integration.conftest import ROOT, Topics
from tests.integration.kafka_tools import committed_offsets
from tests.integration.s3_server import free_port
from worker.sandbox.sample import build_sample, produce

pytestmark = pytest.mark.integration


def _check(env: dict[str, str], **changes: str) -> tuple[int, dict[str, str], float]:
    """Run the command; return its exit code, its lines by check name, seconds."""
    started = time.monotonic()
    result = run_cli({**env, **changes}, "check", timeout_s=60)
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    return result.returncode, lines, time.monotonic() - started


def test_check_all_services_up_passes(archive_env: dict[str, str]) -> None:
    """Against the broker, the simulator and the bucket every check is ok."""
    code, lines, _ = _check(archive_env)

    assert code == 0, lines
    assert set(lines) == {"kafka", "track", "schemas", "records", "s3"}
    assert all(line.startswith("ok ") for line in lines.values()), lines
    assert archive_env["CIO_KAFKA__DEAD_LETTER_TOPIC"] in lines["kafka"]


def test_check_wrong_api_key_fails_naming_the_variables(
    archive_env: dict[str, str],
) -> None:
    """A key the API refuses fails the track check with the status and the
    variables to fix; the key itself is not printed."""
    code, lines, _ = _check(archive_env, CIO_API_KEY="wrong-key-9876")

    assert code == 1
    assert lines["track"].startswith("FAIL track")
    assert "401" in lines["track"]
    assert "CIO_SITE_ID and CIO_API_KEY" in lines["track"]
    assert "wrong-key-9876" not in "".join(lines.values())
    assert lines["kafka"].startswith("ok ")


def test_check_region_mismatch_warns_and_passes(archive_env: dict[str, str]) -> None:
    """A workspace in another region than configured is a warning, not a
    failure, and names the setting."""
    code, lines, _ = _check(archive_env, CIO_TRACK__REGION="eu")

    assert code == 0
    assert lines["track"].startswith("WARN track")
    assert "CIO_TRACK__REGION=us" in lines["track"]


def test_check_missing_bucket_fails_naming_it(archive_env: dict[str, str]) -> None:
    """A bucket that does not exist fails the s3 check, saying so and which
    setting to change."""
    code, lines, _ = _check(archive_env, CIO_ARCHIVE__BUCKET="no-such-bucket-cio")

    assert code == 1
    assert lines["s3"].startswith("FAIL s3")
    assert "no-such-bucket-cio" in lines["s3"]
    assert "NoSuchBucket" in lines["s3"]
    assert "CIO_ARCHIVE__BUCKET" in lines["s3"]


def test_check_unreachable_broker_fails_within_seconds(
    archive_env: dict[str, str],
) -> None:
    """A broker address nothing listens on fails the kafka check quickly, with
    the address and the setting; the other checks still report."""
    address = f"127.0.0.1:{free_port()}"

    code, lines, seconds = _check(archive_env, CIO_KAFKA__BOOTSTRAP_SERVERS=address)

    assert code == 1
    assert seconds < 20
    assert lines["kafka"].startswith("FAIL kafka")
    assert address in lines["kafka"]
    assert "CIO_KAFKA__BOOTSTRAP_SERVERS" in lines["kafka"]
    assert lines["track"].startswith("ok ")


def test_check_without_archive_skips_s3(worker_env: dict[str, str]) -> None:
    """No bucket configured: the s3 line says skip and the command passes."""
    code, lines, _ = _check(worker_env)

    assert code == 0
    assert lines["s3"].startswith("skip s3")


def test_check_records_sampled_ok_and_wrong_schema_fails(
    worker_env: dict[str, str], kafka_bootstrap: str, topics: Topics
) -> None:
    """The newest records map with the right schemas; with a schema file that
    parses but is not the producers' one, the records check fails and says
    which setting to fix, and no offset of the group moves."""
    sample = build_sample(30, 60, ROOT / "schemas", bad=False)
    produce(kafka_bootstrap, sample, topics.person, topics.event)
    wrong = ROOT / "schemas" / "person_event.avsc"  # parses, has person_email

    good_code, good, _ = _check(worker_env)
    bad_code, bad, _ = _check(worker_env, CIO_SCHEMAS__PERSON=str(wrong))

    assert good_code == 0, good
    assert good["records"].startswith("ok ")
    assert f"{topics.person}: the 30 newest records map" in good["records"]
    assert f"{topics.event}: the " in good["records"]
    assert bad_code == 1
    assert bad["records"].startswith("FAIL records")
    assert f"{topics.person}: none of the 30 newest records decode" in bad["records"]
    assert "CIO_SCHEMAS__PERSON" in bad["records"]
    assert bad["schemas"].startswith("ok ")
    committed = committed_offsets(kafka_bootstrap, topics.group, topics.person)
    assert all(offset < 0 for offset in committed.values())  # none committed


def test_check_records_some_refused_warns(
    worker_env: dict[str, str], kafka_bootstrap: str, topics: Topics
) -> None:
    """Records that decode but some of which are refused: a warning with the
    reasons, and the command passes."""
    sample = build_sample(10, 0, ROOT / "schemas", bad=True)
    produce(kafka_bootstrap, sample, topics.person, topics.event)

    code, lines, _ = _check(worker_env)

    assert code == 0, lines
    assert lines["records"].startswith("WARN records")
    assert "refused: " in lines["records"]
