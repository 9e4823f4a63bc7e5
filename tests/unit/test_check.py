"""Unit tests of worker.check: result lines, deadlines and the checks that need
no network."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from worker.check import (
    FAIL,
    OK,
    SKIP,
    WARN,
    CheckResult,
    _region_result,
    check_archive,
    check_schemas,
    check_track,
    format_results,
    run_checks,
)
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def settings(**sections: object) -> Settings:
    return Settings(**sections)  # type: ignore[arg-type]


def test_format_results_one_aligned_line_per_check() -> None:
    """Status, then the name padded to the longest, then the message."""
    results = [
        CheckResult("kafka", OK, "reached b:1"),
        CheckResult("schemas", FAIL, "missing"),
    ]

    text = format_results(results)

    assert text.splitlines() == [
        "ok   kafka    reached b:1",
        "FAIL schemas  missing",
    ]


@pytest.mark.parametrize(
    ("status", "passed"), [(OK, True), (WARN, True), (SKIP, True), (FAIL, False)]
)
def test_check_result_passed_unless_failed(status: str, passed: bool) -> None:
    """Only a FAIL fails the command; a warning or a skipped check does not."""
    assert CheckResult("x", status, "m").passed is passed


def test_run_checks_hung_check_fails_at_the_deadline() -> None:
    """A check that never answers becomes a FAIL line when the deadline passes,
    and the others still report."""
    release = threading.Event()

    def hangs(_: Settings) -> CheckResult:
        release.wait(10)
        return CheckResult("late", OK, "too late")

    def answers(_: Settings) -> CheckResult:
        return CheckResult("fast", OK, "fine")

    results = run_checks(settings(), [hangs, answers], timeout_s=0.2)
    release.set()

    assert [r.status for r in results] == [FAIL, OK]
    assert results[0].name == "hangs"
    assert "no answer within" in results[0].message


def test_run_checks_raising_check_is_a_fail_line() -> None:
    """An unexpected exception inside a check is reported, not raised."""

    def broken(_: Settings) -> CheckResult:
        raise RuntimeError("boom")

    (result,) = run_checks(settings(), [broken], timeout_s=5)

    assert result.status == FAIL
    assert result.message == "RuntimeError: boom"


def test_check_track_without_credentials_says_which_variables() -> None:
    """Missing credentials fail the check before any request, naming the
    variables to set."""
    result = check_track(settings())

    assert result.status == FAIL
    assert "CIO_SITE_ID" in result.message
    assert "CIO_API_KEY" in result.message


@pytest.mark.parametrize(
    ("configured", "answered", "status"),
    [("us", "us", OK), ("eu", "eu", OK), ("us", "eu", WARN), ("eu", "us", WARN)],
)
def test_region_result_warns_when_regions_differ(
    configured: str, answered: str, status: str
) -> None:
    """A workspace in another region than configured is a warning that names
    the setting to change."""
    result = _region_result("https://t", configured, {"region": answered})

    assert result.status == status
    if status == WARN:
        assert f"CIO_TRACK__REGION={answered}" in result.message


def test_check_schemas_real_files_parse() -> None:
    """The project's schemas pass."""
    result = check_schemas(
        settings(
            schemas={
                "person": ROOT / "schemas/person.avsc",
                "event": ROOT / "schemas/person_event.avsc",
            }
        )
    )

    assert result.status == OK


def test_check_schemas_missing_file_names_it_and_the_setting(tmp_path: Path) -> None:
    """A missing schema file fails with its path and the variable to set."""
    missing = tmp_path / "nope.avsc"

    result = check_schemas(
        settings(schemas={"person": missing, "event": ROOT / "schemas/person.avsc"})
    )

    assert result.status == FAIL
    assert str(missing) in result.message
    assert "CIO_SCHEMAS__PERSON" in result.message


def test_check_archive_without_bucket_is_skipped() -> None:
    """No bucket configured: the S3 check is skipped, which passes."""
    result = check_archive(settings())

    assert result.status == SKIP
    assert "CIO_ARCHIVE__BUCKET" in result.message
