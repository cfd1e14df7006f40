"""Every Redis key Headrace writes (besides kombu's own), built in one place."""

from __future__ import annotations

PREFIX = "headrace"


def publisher_sweep_lock() -> str:
    """Held by the one worker running the publisher sweep at a time."""
    return f"{PREFIX}:lock:publisher-sweep"
