"""Continuous-refill token buckets, the way both providers describe their per-minute limits.

A bucket's capacity is the per-minute limit and it refills limit/60 per second; there is never a
reset at a minute boundary. Consequently any 60 s window can admit up to 2x the limit (a full
bucket plus a minute of refill), exactly as a real provider's bucket would.

All methods are synchronous and the server runs one event loop, so an admission (check every
bucket, then take from all of them) is atomic without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass

BucketScope = tuple[str, str, str]  # (dialect, api key, model)


class TokenBucket:
    def __init__(self, capacity: int, now: float) -> None:
        self.capacity = capacity
        self.level = float(capacity)
        self.updated = now

    @property
    def rate_per_s(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.level = min(float(self.capacity), self.level + elapsed * self.rate_per_s)
        self.updated = now

    def resize(self, capacity: int) -> None:
        self.capacity = capacity
        self.level = min(self.level, float(capacity))

    def wait_s(self, amount: int) -> float | None:
        """Seconds until `amount` fits (0 if it fits now), None if it never can."""
        if amount > self.capacity:
            return None
        # The tolerance absorbs float error so a caller who waits exactly the advertised time fits.
        if self.level >= amount - 1e-6:
            return 0.0
        return (amount - self.level) / self.rate_per_s

    def seconds_to_full(self) -> float:
        return (self.capacity - self.level) / self.rate_per_s


@dataclass(frozen=True)
class Denial:
    bucket: str
    limit: int
    used: int
    requested: int
    wait_s: float | None  # None: the request is larger than the bucket and can never fit


@dataclass(frozen=True)
class BucketState:
    bucket: str
    limit: int
    remaining: int
    seconds_to_full: float


class Limiter:
    """Every bucket of every (dialect, api key, model), created full on first use."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[BucketScope, str], TokenBucket] = {}

    def clear(self) -> None:
        self._buckets.clear()

    def admit(
        self, scope: BucketScope, charges: dict[str, int], limits: dict[str, int | None], now: float
    ) -> Denial | None:
        """Take every charge if all of them fit now; otherwise take nothing and say why."""
        denials: list[Denial] = []
        for name, amount in charges.items():
            bucket = self._bucket(scope, name, limits.get(name), now)
            if bucket is None:
                continue
            wait = bucket.wait_s(amount)
            if wait != 0.0:
                used = round(bucket.capacity - bucket.level)
                denials.append(Denial(name, bucket.capacity, used, amount, wait))
        if denials:
            # Report the bucket that can never fit, else the one the caller must wait longest for.
            return max(denials, key=lambda d: float("inf") if d.wait_s is None else d.wait_s)
        for name, amount in charges.items():
            bucket = self._bucket(scope, name, limits.get(name), now)
            if bucket is not None:
                bucket.level -= amount
        return None

    def refund(
        self, scope: BucketScope, name: str, amount: int, limits: dict[str, int | None], now: float
    ) -> None:
        bucket = self._bucket(scope, name, limits.get(name), now)
        if bucket is not None and amount > 0:
            bucket.level = min(float(bucket.capacity), bucket.level + amount)

    def states(self, scope: BucketScope, limits: dict[str, int | None], now: float) -> list[BucketState]:
        states = []
        for name, limit in limits.items():
            bucket = self._bucket(scope, name, limit, now)
            if bucket is not None:
                remaining = max(0, int(bucket.level))
                states.append(BucketState(name, bucket.capacity, remaining, bucket.seconds_to_full()))
        return states

    def _bucket(self, scope: BucketScope, name: str, limit: int | None, now: float) -> TokenBucket | None:
        if limit is None:
            return None
        bucket = self._buckets.get((scope, name))
        if bucket is None:
            bucket = self._buckets[(scope, name)] = TokenBucket(limit, now)
            return bucket
        bucket.refill(now)
        if bucket.capacity != limit:
            bucket.resize(limit)
        return bucket
