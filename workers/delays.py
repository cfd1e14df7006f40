"""Requests that must wait longer than a worker should hold a slot: parked in Redis, published again
when their time comes (Celery countdowns would sit unacknowledged in some worker's memory, and run
twice once they outlast the broker's visibility timeout).

Each worker process publishes them on a thread of its own (``DelayPublisher``) that sleeps until
the next one is due, woken at once when its process parks one; it looks at least every
``IDLE_CHECK_S`` for those parked by other processes (their own publisher is usually there
first). An idle pool does not poll the delay queue four times a second per worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import redis
from kombu.exceptions import KombuError

from broker_config import keys
from broker_config.scripts import lua_source

log = logging.getLogger(__name__)
CLAIM_LEASE_MS = 60_000
# Requests due this soon go with the round being published: one round, not one per request.
CLAIM_EARLY_MS = 50
# The longest a publisher sleeps: requests parked by a process that died are published this late.
IDLE_CHECK_S = 1.0

Publish = Callable[[Sequence[tuple[str, str]]], object]


class DelayQueue:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._claim = client.register_script(lua_source("delayed_claim.lua"))
        self._release = client.register_script(lua_source("delayed_release.lua"))
        self._wait_on = client.register_script(lua_source("delayed_wait_on.lua"))
        # Set whenever this process parks or wakes a request: its publisher looks again at once.
        self.parked = threading.Event()

    def park(self, request_id: str, priority: str, delay_s: float, wake_on: Sequence[str] = ()) -> None:
        """Publish ``request_id`` again in ``delay_s`` seconds (server time), or sooner when the
        breaker of a deployment in ``wake_on`` closes (``wake``)."""
        now_s, now_us = self.redis.time()
        ready_ms = now_s * 1000 + now_us / 1000 + delay_s * 1000
        member = f"{priority}|{request_id}"
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        pipe.zadd(keys.delayed_requests(), {member: ready_ms})
        for deployment in wake_on:
            args: list[str | float] = [member, ready_ms, int(delay_s * 1000) + 60_000]
            self._wait_on(keys=[keys.breaker_waiters(deployment)], args=args, client=pipe)
        pipe.execute()
        self.parked.set()

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
        self.parked.set()
        return int(changed or 0)

    def publish_due(self, publish: Publish, limit: int = 1000) -> int:
        """Publish every due request once; returns how many."""
        return self.publish_round(publish, limit)[0]

    def publish_round(
        self, publish: Publish, limit: int = 1000, early_ms: int = 0
    ) -> tuple[int, float | None]:
        """Publish every request due (within ``early_ms``) once: how many, and how long until the
        next one left is due (None: none is parked)."""
        args = [limit, CLAIM_LEASE_MS, early_ms]
        lease_until, next_in_ms, *claimed = self._claim(keys=[keys.delayed_requests()], args=args)
        next_in_s = None if int(next_in_ms) < 0 else int(next_in_ms) / 1000
        members = [m.decode() for m in claimed]
        if members:
            split = (m.partition("|") for m in members)
            pairs = [(request_id, priority) for priority, _, request_id in split]
            publish(pairs)
            # Not a plain ZREM: a member parked again since the claim (its message already ran) stays.
            self._release(keys=[keys.delayed_requests()], args=[lease_until, *members])
        return len(members), next_in_s

    def waiting(self) -> int:
        return int(self.redis.zcard(keys.delayed_requests()))


class DelayPublisher(threading.Thread):
    """Publishes this process's (and, at least every ``idle_check_s``, any) parked requests when
    they are due, sleeping in between; never raises."""

    def __init__(self, delays: DelayQueue, publish: Publish, idle_check_s: float = IDLE_CHECK_S) -> None:
        super().__init__(name="headrace-delays", daemon=True)
        self.delays = delays
        self.publish = publish
        self.idle_check_s = idle_check_s
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            wait_s = self.idle_check_s
            try:
                _, next_in_s = self.delays.publish_round(self.publish, early_ms=CLAIM_EARLY_MS)
                if next_in_s is not None:
                    wait_s = min(next_in_s, self.idle_check_s)
            except (redis.RedisError, KombuError) as exc:
                log.warning("delayed requests not published: Redis unreachable (%s)", exc)
            except Exception:
                log.exception("publishing delayed requests failed; will try again")
            # Cleared after the wait: a park in between is seen by the round that follows anyway.
            self.delays.parked.wait(wait_s)
            self.delays.parked.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.delays.parked.set()
