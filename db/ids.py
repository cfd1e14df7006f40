"""Public identifiers that sort by creation time, so that ``ORDER BY id`` is a time order.

Hand-written rather than a ULID dependency: it is twelve lines, and we want our own prefix
and alphabet (lower-case Crockford base32) in every id.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def _base32(number: int, length: int) -> str:
    chars = []
    for _ in range(length):
        number, rem = divmod(number, 32)
        chars.append(_ALPHABET[rem])
    return "".join(reversed(chars))


def new_id(prefix: str, at_ms: int | None = None) -> str:
    """``prefix_`` + 10 chars of milliseconds since the epoch (now, or ``at_ms``) + 16 random chars
    (80 bits)."""
    millis = time.time_ns() // 1_000_000 if at_ms is None else at_ms
    return f"{prefix}_{_base32(millis, 10)}{_base32(int.from_bytes(os.urandom(10), 'big'), 16)}"


def id_floor(prefix: str, at_ms: int) -> str:
    """Below every id made from ``at_ms`` on, above every id made before: ``id >= id_floor(...)`` is
    "created since", answered by the primary key's index."""
    return f"{prefix}_{_base32(at_ms, 10)}"
