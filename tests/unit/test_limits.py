"""Unit tests of worker.limits: the per-entry size limit in UTF-8 bytes."""

from __future__ import annotations

import pytest

from worker.errors import ValidationError
from worker.limits import MAX_ENTRY_BYTES, check_entry_size
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
