"""Requests that must wait longer than a worker should hold a slot: parked in Redis, published again
when their time comes (Celery countdowns would sit unacknowledged in some worker's memory, and run
twice once they outlast the broker's visibility timeout)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import redis

from broker_config import keys
from workers.admission import LUA_DIR

log = logging.getLogger(__name__)
CLAIM_LEASE_MS = 60_000


class DelayQueue:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script((LUA_DIR / "delayed_claim.lua").read_text())
        self._release = client.register_script((LUA_DIR / "delayed_release.lua").read_text())

    def park(self, request_id: str, priority: str, delay_s: float) -> None:
        """Publish ``request_id`` again in ``delay_s`` seconds (server time)."""
        now_s, now_us = self.redis.time()
        ready_ms = now_s * 1000 + now_us / 1000 + delay_s * 1000
        self.redis.zadd(keys.delayed_requests(), {f"{priority}|{request_id}": ready_ms})

    def publish_due(self, publish: Callable[[Sequence[tuple[str, str]]], object], limit: int = 1000) -> int:
        """Publish every due request once; returns how many."""
        lease_until, *claimed = self._claim(keys=[keys.delayed_requests()], args=[limit, CLAIM_LEASE_MS])
        members = [m.decode() for m in claimed]
        if not members:
            return 0
        pairs = [(request_id, priority) for priority, _, request_id in (m.partition("|") for m in members)]
        publish(pairs)
        # Not a plain ZREM: a member parked again since the claim (its message already ran) stays.
        self._release(keys=[keys.delayed_requests()], args=[lease_until, *members])
        return len(members)

    def waiting(self) -> int:
        return int(self.redis.zcard(keys.delayed_requests()))
