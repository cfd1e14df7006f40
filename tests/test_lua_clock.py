"""Redis's clock steps back (a failover to a replica whose clock is behind): every script's
elapsed time is clamped at zero and stored times never move backwards, so buckets neither drain
nor refill twice, pauses and breakers never ask for a wait longer than they were set for, and the
rate factor never sinks. Driven through the scripts' clock override (ARGV[1]) on a real Redis."""

from __future__ import annotations

import pytest
import redis as redis_lib

from broker_config.bucket_state import read_state
from broker_config.deployments import Deployment
from workers.admission import Bucket, BucketPolicy, Charge, Settlement
from workers.breaker import Breaker, BreakerPolicy

T0 = 1_700_000_000_000.0  # ms, a realistic Redis TIME
TEN_MINUTES_MS = 600_000
DEPLOYMENT = Deployment(name="d", provider="openai", model="m", rpm=60, tpm=6000)
BREAKER = BreakerPolicy(window_s=30, min_calls=10, failure_ratio=0.5, open_s=15, probes=2)


@pytest.fixture
def clock() -> list[float]:
    return [T0]


def _charges(tokens: float) -> list[Charge]:
    return [Charge("requests", 60, 1), Charge("tokens", 6000, tokens)]


def _levels(redis: redis_lib.Redis, clock: list[float]) -> dict[str, float]:
    state = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
    return {limit.name: limit.level for limit in state.limits}


def _stamp(redis: redis_lib.Redis, key: str) -> float:
    return float(redis.hget(key, "ts") or 0)


def test_a_bucket_neither_drains_nor_refills_while_the_clock_is_behind(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Before: level = stored + (now - since) x rate went deeply negative, and every take waited
    for the whole step. Now the bucket holds its level until the clock catches up, then refills
    from where it stood."""
    bucket = Bucket(redis, BucketPolicy(first_call_s=0.0), clock_ms=lambda: clock[0])
    assert bucket.take("d", "a", _charges(3000), priority="interactive", ttl_s=60).status == "granted"
    clock[0] = T0 - TEN_MINUTES_MS
    assert bucket.take("d", "b", _charges(2000), priority="interactive", ttl_s=60).status == "granted"
    assert _stamp(redis, "headrace:{d}:bucket") == T0  # the stored time did not move back
    assert _levels(redis, clock)["tokens"] == pytest.approx(1000)
    shown = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
    assert shown.clock_behind_s == pytest.approx(600)
    # A settlement while behind refunds what was not used, and drains nothing.
    assert bucket.settle("d", "a", _charges(0), Settlement(used={"requests": 1, "tokens": 500})).found
    assert _levels(redis, clock)["tokens"] == pytest.approx(3500)
    # Caught up: refill counts from T0 only, never the ten minutes twice.
    clock[0] = T0 + 6000
    assert _levels(redis, clock)["tokens"] == pytest.approx(3500 + 600)
    assert read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0]).clock_behind_s == 0


def test_a_pause_and_the_rate_factor_survive_a_clock_stepping_back(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Before: a 2.5 s pause asked for 602.5 s from a clock ten minutes behind, and the rate factor
    fell to 0.7 - 600 s x 1%/s = -5.3."""
    bucket = Bucket(redis, BucketPolicy(first_call_s=0.0), clock_ms=lambda: clock[0])
    bucket.take("d", "a", _charges(100), priority="interactive", ttl_s=60)
    limited = Settlement(used={"requests": 0, "tokens": 0}, rate_limited=True, pause_s=2.5)
    bucket.settle("d", "a", _charges(0), limited)
    clock[0] = T0 - TEN_MINUTES_MS
    paused = bucket.take("d", "b", _charges(100), priority="interactive", ttl_s=60)
    assert paused.status == "wait" and paused.reason == "paused" and paused.wait_s == pytest.approx(2.5)
    shown = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
    assert shown.rate_factor == pytest.approx(0.7) and shown.paused_for_s == pytest.approx(2.5)
    assert all(limit.effective > 0 for limit in shown.limits)


def test_a_breaker_never_asks_for_more_than_its_open_period_when_the_clock_steps_back(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Before: an open breaker asked a clock an hour behind to wait an hour and 15 s. Now each
    check waits at most open_s, the breaker's stored times never move back, and it half-opens
    open_s after it opened on its own (monotonic) clock."""
    breaker = Breaker(redis, BREAKER, clock_ms=lambda: clock[0])
    transitions = [breaker.record("d", f"c{i}", failed=True, probe=False) for i in range(10)]
    assert transitions[-1] == "opened"
    clock[0] = T0 - 3_600_000
    permit = breaker.allow("d")
    assert not permit.allowed and 0 < permit.wait_s <= BREAKER.open_s
    assert breaker.record("d", "late", failed=False, probe=False) == ""
    assert _stamp(redis, "headrace:{d}:breaker") == T0
    assert redis.zscore("headrace:{d}:breaker-calls", "late") == T0  # stamped on the breaker's clock
    clock[0] = T0 + BREAKER.open_s * 1000
    assert breaker.allow("d").probe
