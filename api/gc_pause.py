"""Pausing CPython's cyclic garbage collector while a large batch is read, checked and committed.

A 50,000-line batch is some 200,000 live container objects while it is read. Each full (gen-2)
collection walks them all, 100-160 ms here, holding the GIL: the event loop, /healthz included,
stops that long, two or three times per upload. Reading a batch creates no reference cycles (what
it builds is freed by reference counting), so the collector is paused for the duration instead.

The pause is shared by concurrent uploads (counted) and bounded: once the collector has been off
for ``MAX_PAUSE_S`` in a row (a slow client, overlapping uploads), ``enforce_bound`` (called as
chunks and lines go by) and every new pause switch it back on until all current pauses have
ended, so cyclic garbage is never left uncollected for long.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

MAX_PAUSE_S = 30.0

_lock = threading.Lock()
_holders = 0
_paused_at: float | None = None  # set while this module holds the collector off


def enforce_bound() -> None:
    """Switch the collector back on if it has been paused too long."""
    global _paused_at
    if _paused_at is not None and time.monotonic() - _paused_at > MAX_PAUSE_S:
        with _lock:
            if _paused_at is not None:
                gc.enable()
                _paused_at = None


@contextmanager
def gc_paused() -> Iterator[None]:
    global _holders, _paused_at
    with _lock:
        _holders += 1
        if _holders == 1 and gc.isenabled():
            gc.disable()
            _paused_at = time.monotonic()
    enforce_bound()
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _paused_at is not None:
                gc.enable()
                _paused_at = None
