"""Unit tests of worker.track that need no server: Retry-After parsing."""

from __future__ import annotations

import pytest
from requests.structures import CaseInsensitiveDict

from worker.track import parse_retry_after

# Wed, 21 Oct 2015 07:28:00 GMT
DATE_EPOCH = 1_445_412_480.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("1", 1.0),
        ("120", 120.0),
        (" 7 ", 7.0),
    ],
)
def test_parse_retry_after_seconds_returns_seconds(value: str, expected: float) -> None:
    """A delay in whole seconds is returned as that many seconds."""
    headers = {"Retry-After": value}

    seconds = parse_retry_after(headers)

    assert seconds == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (DATE_EPOCH - 80.0, 80.0),
        (DATE_EPOCH - 0.5, 0.5),
        (DATE_EPOCH, 0.0),
        (DATE_EPOCH + 100.0, 0.0),  # a date in the past means now, never negative
    ],
)
def test_parse_retry_after_http_date_returns_seconds_until_it(
    now: float, expected: float
) -> None:
    """An HTTP-date gives the seconds from now until that date, at least zero."""
    headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}

    seconds = parse_retry_after(headers, now=now)

    assert seconds == pytest.approx(expected)


@pytest.mark.parametrize("value", ["soon", "1.5", "-5", "", "   ", "Wed, 99 Foo"])
def test_parse_retry_after_garbage_returns_none(value: str) -> None:
    """A value that is neither whole seconds nor an HTTP-date is ignored."""
    headers = {"Retry-After": value}

    seconds = parse_retry_after(headers, now=DATE_EPOCH)

    assert seconds is None


@pytest.mark.parametrize("value", ["²", "³"])
def test_parse_retry_after_non_ascii_digit_returns_none(value: str) -> None:
    """A superscript digit is garbage, not a number of seconds."""
    headers = {"Retry-After": value}

    seconds = parse_retry_after(headers, now=DATE_EPOCH)

    assert seconds is None


def test_parse_retry_after_missing_returns_none() -> None:
    """Without a Retry-After header there is no hint."""
    headers: dict[str, str] = {"Content-Type": "application/json"}

    seconds = parse_retry_after(headers)

    assert seconds is None


def test_parse_retry_after_header_name_case_insensitive() -> None:
    """The header is found whatever its case, as in a requests response."""
    headers = CaseInsensitiveDict({"retry-after": "3"})

    seconds = parse_retry_after(headers)

    assert seconds == 3.0
