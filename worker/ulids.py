"""ULID text straight from its parts, without building ``ulid.ULID`` objects.

A ULID's text is its 128 bits, big-endian, in Crockford's base32: 26
characters, the first of which holds only 3 bits (so it is 0-7). That is the
10 characters of the 48-bit time part followed by the 16 of the 80-bit random
part, exactly what ``str(ulid.ULID.from_bytes(...))`` writes. Here each 10 bits
are looked up as a pair of characters, 13 lookups per ULID.
"""

from __future__ import annotations

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = tuple(a + b for a in CROCKFORD for b in CROCKFORD)
MAX_MILLIS = (1 << 48) - 1
_TEN_BITS = 0x3FF


def ulid_text(millis: int, randomness: bytes) -> str:
    """The ULID of a 48-bit time part and 10 random bytes, as text.

    ``millis`` must lie in 0 .. 2**48 - 1 (OverflowError otherwise, as
    ``int.to_bytes(6)`` raises) and ``randomness`` must be 10 bytes.
    """
    if not 0 <= millis <= MAX_MILLIS:
        millis.to_bytes(6, "big")  # raises OverflowError, as python-ulid's path did
    if len(randomness) != 10:
        raise ValueError("the random part of a ULID is 10 bytes")
    p = _PAIRS
    m = millis
    high = int.from_bytes(randomness[:5], "big")
    low = int.from_bytes(randomness[5:], "big")
    return "".join(
        (
            p[m >> 40],
            p[(m >> 30) & _TEN_BITS],
            p[(m >> 20) & _TEN_BITS],
            p[(m >> 10) & _TEN_BITS],
            p[m & _TEN_BITS],
            p[high >> 30],
            p[(high >> 20) & _TEN_BITS],
            p[(high >> 10) & _TEN_BITS],
            p[high & _TEN_BITS],
            p[low >> 30],
            p[(low >> 20) & _TEN_BITS],
            p[(low >> 10) & _TEN_BITS],
            p[low & _TEN_BITS],
        )
    )
