"""Requests that must wait longer than a worker should hold a slot: parked in Redis, published again
when their time comes (Celery countdowns would sit unacknowledged in some worker's memory, and run
twice once they outlast the broker's visibility timeout)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import redis

from broker_config import keys
from broker_config.scripts import lua_source

log = logging.getLogger(__name__)
CLAIM_LEASE_MS = 60_000


class DelayQueue:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(lua_source("delayed_claim.lua"))
        self._release = client.register_script(lua_source("delayed_release.lua"))

    def park(self, request_id: str, priority: str, delay_s: float, wake_on: Sequence[str] = ()) -> None:
        """Publish ``request_id`` again in ``delay_s`` seconds (server time), or sooner when the
        breaker of a deployment in ``wake_on`` closes (``wake``)."""
        now_s, now_us = self.redis.time()
        ready_ms = now_s * 1000 + now_us / 1000 + delay_s * 1000
        member = f"{priority}|{request_id}"
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        pipe.zadd(keys.delayed_requests(), {member: ready_ms})
        for deployment in wake_on:
            waiters, ttl_ms = keys.breaker_waiters(deployment), int(delay_s * 1000) + 60_000
            pipe.zadd(waiters, {member: ready_ms})
            # Kept as long as its longest wait: a waiter due anyway needs no waking.
            pipe.pexpire(waiters, ttl_ms, gt=True)
            pipe.pexpire(waiters, ttl_ms, nx=True)
        pipe.execute()

    def wake(self, deployment: str) -> int:
        """The deployment's breaker closed: its waiters are due now (the bucket paces them like any
        other request). Returns how many were still waiting."""
        waiters = keys.breaker_waiters(deployment)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrangebyscore(waiters, "-inf", "+inf")
        pipe.delete(waiters)
        members, _ = pipe.execute()
        if not members:
            return 0
        now_s, now_us = self.redis.time()
        now_ms = now_s * 1000 + now_us / 1000
        # XX: only members still parked; LT: never later than they were due.
        changed = self.redis.zadd(
            keys.delayed_requests(), dict.fromkeys(members, now_ms), xx=True, lt=True, ch=True
        )
        return int(changed or 0)

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
