"""Customer.io's Track API limits, checked before an entry is sent.

Sizes are UTF-8 bytes of the compact JSON that is sent. Customer.io documents each
entry as "32 kb or less"; 32,000 bytes is the stricter reading, so an entry that
passes here passes under either.
"""

from __future__ import annotations

from worker.errors import ValidationError

MAX_ENTRY_BYTES = 32_000


def check_entry_size(entry_bytes: bytes) -> None:
    """Raise ValidationError when a serialized entry is over the per-entry limit."""
    if len(entry_bytes) > MAX_ENTRY_BYTES:
        raise ValidationError(
            "entry_too_large",
            f"the entry is {len(entry_bytes)} bytes; Customer.io takes at most "
            f"{MAX_ENTRY_BYTES}",
        )
