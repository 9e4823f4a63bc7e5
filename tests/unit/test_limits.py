"""Unit tests of worker.limits: the per-entry size limit in UTF-8 bytes."""

from __future__ import annotations

import math
from typing import Any

import pytest

from worker.errors import ValidationError
from worker.limits import MAX_ENTRY_BYTES, LimitsError, check_entry_size, checked_entry
from worker.mapping import serialize


@pytest.mark.parametrize("size", [0, 1, 31_999, 32_000])
def test_check_entry_size_within_limit_accepted(size: int) -> None:
    """Entries of up to 32,000 bytes pass."""
    entry = b"x" * size

    check_entry_size(entry)

    assert MAX_ENTRY_BYTES == 32_000


@pytest.mark.parametrize("size", [32_001, 32_002, 100_000])
def test_check_entry_size_over_limit_raises_entry_too_large(size: int) -> None:
    """Entries over 32,000 bytes are refused with reason entry_too_large."""
    entry = b"x" * size

    with pytest.raises(ValidationError) as caught:
        check_entry_size(entry)

    assert caught.value.reason == "entry_too_large"
    assert caught.value.stage == "validate"
    assert str(size) in caught.value.message


def test_check_entry_size_counts_utf8_bytes_not_characters() -> None:
    """An entry under 32,000 characters but over 32,000 UTF-8 bytes is refused."""
    entry = serialize({"v": "é" * 16_000})  # 16,008 characters, 32,008 bytes

    with pytest.raises(ValidationError) as caught:
        check_entry_size(entry)

    assert len(entry.decode()) < MAX_ENTRY_BYTES
    assert caught.value.reason == "entry_too_large"


# -- every limit, exact at its boundary ---------------------------------------------

ULID_ID = "01HGW1Z9K2X3Y4Z5A6B7C8D9E0"


def identify(attributes: dict[str, Any], email: str = "a@x.io") -> dict[str, Any]:
    return {
        "type": "person",
        "action": "identify",
        "identifiers": {"email": email},
        "attributes": attributes,
    }


def event(
    name: str = "e", data: dict[str, Any] | None = None, event_id: Any = ULID_ID
) -> dict[str, Any]:
    return {
        "type": "person",
        "action": "event",
        "identifiers": {"email": "a@x.io"},
        "name": name,
        "id": event_id,
        "attributes": data or {},
    }


def anonymous(anonymous_id: str, name: str = "e") -> dict[str, Any]:
    return {
        "type": "person",
        "action": "event",
        "anonymous_id": anonymous_id,
        "name": name,
        "id": ULID_ID,
        "attributes": {},
    }


def many(count: int, value: Any = 1) -> dict[str, Any]:
    return {f"a{i:04d}": value for i in range(count)}


def data_of_size(size: int) -> dict[str, str]:
    """Event data whose compact JSON is exactly ``size`` bytes, in 900-byte values."""
    data: dict[str, str] = {}
    used = 2  # {}
    while used < size:
        key = f"k{len(data):04d}"
        overhead = len(f'"{key}":""') + (1 if data else 0)
        room = size - used - overhead
        chunk = 900 if room > 940 else room
        data[key] = "x" * chunk
        used += overhead + chunk
    assert len(serialize(data)) == size
    return data


@pytest.mark.parametrize(
    ("entry", "reasons"),
    [
        # event name: 100 bytes of ASCII pass, 36 CJK characters (108 bytes) fail
        (event("n" * 100), []),
        (event("n" * 101), ["event_name_too_long"]),
        (event("日" * 33), []),  # 99 bytes
        (event("日" * 34), ["event_name_too_long"]),  # 102 bytes
        (event("日" * 36), ["event_name_too_long"]),  # 108 bytes
        # identifier: 150 bytes
        (identify({}, "a" * 145 + "@x.io"), []),
        (identify({}, "a" * 146 + "@x.io"), ["identifier_too_long"]),
        (identify({}, "é" * 72 + "@x.io"), []),  # 149 bytes
        (identify({}, "é" * 73 + "@x.io"), ["identifier_too_long"]),  # 151 bytes
        (anonymous("a" * 150), []),
        (anonymous("a" * 151), ["identifier_too_long"]),
        (anonymous("é" * 76), ["identifier_too_long"]),  # 152 bytes
        (anonymous("a", "n" * 101), ["event_name_too_long"]),
        # attribute count: 300
        (identify(many(300)), []),
        (identify(many(301)), ["too_many_attributes"]),
        # attribute name: 150 bytes
        (identify({"n" * 150: 1}), []),
        (identify({"n" * 151: 1}), ["attribute_name_too_long"]),
        (identify({"ñ" * 75: 1}), []),
        (identify({"ñ" * 76: 1}), ["attribute_name_too_long"]),
        # attribute value: 1,000 bytes; a string by its UTF-8, others as JSON
        (identify({"v": "x" * 1000}), []),
        (identify({"v": "x" * 1001}), ["attribute_value_too_long"]),
        (identify({"v": "é" * 500}), []),
        (identify({"v": "é" * 501}), ["attribute_value_too_long"]),
        (identify({"v": '"' * 1000}), []),  # JSON escaping is not counted
        (identify({"v": list(range(277))}), []),  # 999 bytes of JSON
        (identify({"v": list(range(278))}), ["attribute_value_too_long"]),
        (identify({"v": {"k": "x" * 992}}), []),  # {"k":"..."} is 1,000 bytes
        (identify({"v": {"k": "x" * 993}}), ["attribute_value_too_long"]),
        # scalars are measured as their JSON and are never too long
        (identify({"v": 1, "w": 2.5, "b": True, "n": None}), []),
        # event data: 100,000 bytes in all (the entry is then too large as well)
        (event(data=data_of_size(100_000)), ["entry_too_large"]),
        (
            event(data=data_of_size(100_001)),
            ["event_data_too_large", "entry_too_large"],
        ),
        # non-finite numbers, wherever they are
        (identify({"v": math.nan}), ["not_finite"]),
        (identify({"v": math.inf, "w": [-math.inf]}), ["not_finite", "not_finite"]),
        (event(data={"price": math.nan}), ["not_finite"]),
        (identify({"v": "NaN and Infinity as text are fine"}), []),
        # event ids must be ULIDs
        (event(event_id="abc-123"), ["invalid_event_id"]),
        (event(event_id=ULID_ID.lower()), []),
        (event(event_id="8" + ULID_ID[1:]), ["invalid_event_id"]),  # > 128 bits
        (event(event_id=ULID_ID[:-1] + "U"), ["invalid_event_id"]),  # not base32
        (event(event_id=42), ["invalid_event_id"]),
    ],
)  # fmt: skip
def test_checked_entry_limits_exact_at_boundaries(
    entry: dict[str, Any], reasons: list[str]
) -> None:
    """Each limit passes at its boundary and fails one byte over, in UTF-8 bytes."""
    if not reasons:
        assert checked_entry(entry) == serialize(entry)
        return

    with pytest.raises(LimitsError) as caught:
        checked_entry(entry)

    assert [p.reason for p in caught.value.problems] == reasons
    assert caught.value.reason == reasons[0]
    assert caught.value.stage == "validate"


@pytest.mark.parametrize(("size", "ok"), [(32_000, True), (32_001, False)])
def test_checked_entry_entry_size_exact_at_32000_bytes(size: int, ok: bool) -> None:
    """An entry of 32,000 bytes passes and one of 32,001 does not."""
    entry = identify({})
    entry["attributes"] = data_of_size(size - len(serialize(entry)) + 2)
    assert len(serialize(entry)) == size

    if ok:
        assert len(checked_entry(entry)) == size
        return
    with pytest.raises(LimitsError) as caught:
        checked_entry(entry)
    assert caught.value.reason == "entry_too_large"
    assert caught.value.field is None


def test_checked_entry_attributes_total_over_100000_bytes() -> None:
    """All attributes together are limited to 100,000 bytes."""
    entry = identify(many(101, "x" * 990))

    with pytest.raises(LimitsError) as caught:
        checked_entry(entry)

    reasons = [p.reason for p in caught.value.problems]
    assert reasons == ["attributes_too_large", "entry_too_large"]


def test_checked_entry_every_problem_named_in_message() -> None:
    """One error names every broken limit and its field; the first is the reason."""
    entry = event("日" * 36, data={"price": math.nan}, event_id="nope")
    entry["identifiers"] = {"email": "a" * 151}

    with pytest.raises(LimitsError) as caught:
        checked_entry(entry)

    error = caught.value
    assert (error.reason, error.field) == ("identifier_too_long", "identifiers.email")
    assert [p.reason for p in error.problems] == [
        "identifier_too_long",
        "event_name_too_long",
        "invalid_event_id",
        "not_finite",
    ]
    assert [p.field for p in error.problems] == [
        "identifiers.email",
        "name",
        "id",
        "attributes.price",
    ]
    assert error.message.startswith("4 limits broken: identifier_too_long at ")
    for needle in ("151 bytes", "108 bytes", "attributes.price", "'nope'"):
        assert needle in error.message


def test_checked_entry_many_problems_message_stays_short() -> None:
    """Hundreds of broken values are counted, not all spelled out."""
    entry = identify(many(30, "x" * 1001))

    with pytest.raises(LimitsError) as caught:
        checked_entry(entry)

    assert len(caught.value.problems) == 30
    assert "and 22 more" in caught.value.message
    assert len(caught.value.message) < 1000


def test_checked_entry_attribute_value_field_names_attribute() -> None:
    """The field of a value too long is attributes.<name>."""
    with pytest.raises(LimitsError) as caught:
        checked_entry(identify({"bio": "é" * 600}))

    assert caught.value.field == "attributes.bio"
    assert "1,200 bytes, at most 1,000" in caught.value.message
