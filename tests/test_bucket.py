"""The bucket scripts on a real Redis, against a simple reference model (hypothesis drives both),
with the scripts' test-only clock so that time is exact."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.bucket import Bucket, Charge, Observed, Settlement

LIMITS = {"requests": 60, "tokens": 6000}
FLOORS = {"interactive": 0.0, "default": 0.05, "bulk": 0.10}


@dataclass
class Model:
    """A token bucket per limit, the way the docs describe it, in twenty lines of Python."""

    limits: dict[str, int]
    now: float = 0.0
    level: dict[str, float] = field(default_factory=dict)
    held: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.level = {name: float(cap) for name, cap in self.limits.items()}

    def advance(self, ms: float) -> None:
        for name, cap in self.limits.items():
            self.level[name] = min(cap, self.level[name] + ms * cap / 60000)
        self.now += ms

    def take(self, rid: str, costs: dict[str, float], floor: float) -> tuple[str, float]:
        if any(cost > self.limits[n] for n, cost in costs.items()):
            return "never", 0.0
        wait = 0.0
        for name, cost in costs.items():
            cap = self.limits[name]
            need = min(cost + floor * cap, cap)
            if self.level[name] < need:
                wait = max(wait, (need - self.level[name]) * 60000 / cap)
        if wait > 0:
            return "wait", wait
        for name, cost in costs.items():
            self.level[name] -= cost
        self.held[rid] = dict(costs)
        return "granted", 0.0

    def settle(self, rid: str, used: dict[str, float]) -> None:
        taken = self.held.pop(rid, None)
        if taken is None:
            return
        for name, cost in taken.items():
            self.level[name] = min(self.limits[name], self.level[name] + cost - used[name])


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


@pytest.fixture
def bucket(redis: redis_lib.Redis, clock: list[float]) -> Bucket:
    return Bucket(redis, clock_ms=lambda: clock[0])


def charges(tokens: float, limits: dict[str, int] = LIMITS) -> list[Charge]:
    return [Charge("requests", limits["requests"], 1), Charge("tokens", limits["tokens"], tokens)]


def stored_levels(client: redis_lib.Redis) -> dict[str, float]:
    raw = client.hgetall("headrace:{d}:bucket")
    return {k.decode()[4:]: float(v) for k, v in raw.items() if k.startswith(b"lvl:")}


operation = st.one_of(
    st.tuples(st.just("take"), st.floats(0, 20_000), st.integers(0, 7000), st.sampled_from(list(FLOORS))),
    st.tuples(st.just("settle"), st.floats(0, 20_000), st.integers(0, 30), st.integers(0, 3000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
def test_the_scripts_agree_with_the_reference_model(
    ops: list[tuple[str, float, int, object]], redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Grant, wait and never exactly when the model does; levels equal the model's after every
    step, settlements included (a settled reservation gives back once, an unknown one nothing)."""
    redis.flushdb()
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    model = Model(dict(LIMITS))
    granted: list[str] = []
    for step, (kind, advance, amount, extra) in enumerate(ops):
        clock[0] += advance
        model.advance(advance)
        if kind == "take":
            rid = f"r{step}"
            expected, wait = model.take(rid, {"requests": 1, "tokens": amount}, FLOORS[str(extra)])
            got = bucket.take("d", rid, charges(amount), priority=str(extra))
            assert got.status == expected, (step, got, expected, model.level)
            if expected == "wait":
                assert got.wait_s * 1000 == pytest.approx(math.ceil(wait), abs=1)
            if expected == "granted":
                granted.append(rid)
        else:
            rid = granted[int(amount) % len(granted)] if granted else "none"
            used = {"requests": 1.0, "tokens": float(extra)}  # type: ignore[arg-type]
            model.settle(rid, used)
            bucket.settle("d", rid, charges(0), Settlement(used=used))
        # The script stores a level when it writes; refill it to now to compare with the model.
        since = float(redis.hget("headrace:{d}:bucket", "ts") or clock[0])
        for name, value in stored_levels(redis).items():
            cap = LIMITS[name]
            now_level = min(cap, value + (clock[0] - since) * cap / 60000)
            assert now_level == pytest.approx(model.level[name], abs=1e-6), (step, name)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    takes=st.lists(st.tuples(st.floats(0, 3000), st.integers(1, 2500)), min_size=5, max_size=60),
)
def test_never_grants_more_than_the_limit_allows_in_any_window(
    takes: list[tuple[float, int]], redis: redis_lib.Redis, clock: list[float]
) -> None:
    """In every window [a, b]: granted tokens <= capacity + refill over (b - a)."""
    redis.flushdb()
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    grants: list[tuple[float, int]] = []
    for i, (advance, tokens) in enumerate(takes):
        clock[0] += advance
        if bucket.take("d", f"r{i}", charges(tokens), priority="interactive").status == "granted":
            grants.append((clock[0], tokens))
    cap, rate = LIMITS["tokens"], LIMITS["tokens"] / 60000
    for i, (start, _) in enumerate(grants):
        total = 0
        for end, tokens in grants[i:]:
            total += tokens
            assert total <= cap + rate * (end - start) + 1e-6


def test_refill_is_continuous_not_a_minute_reset(bucket: Bucket, clock: list[float]) -> None:
    """Empty the bucket; the advertised wait is exact: a millisecond early is still too early."""
    assert bucket.take("d", "a", charges(6000), priority="interactive").status == "granted"
    waiting = bucket.take("d", "b", charges(600), priority="interactive")
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(6.0)
    clock[0] += 5999
    assert bucket.take("d", "b", charges(600), priority="interactive").status == "wait"
    clock[0] += 1
    assert bucket.take("d", "b", charges(600), priority="interactive").status == "granted"


def test_a_request_larger_than_the_limit_is_refused_for_good(bucket: Bucket) -> None:
    refused = bucket.take("d", "a", charges(6001), priority="interactive")
    assert (refused.status, refused.reason, refused.limit) == ("never", "tokens", 6000)


def test_bulk_leaves_a_share_for_interactive(bucket: Bucket) -> None:
    """With 10% of the bucket left, bulk waits and interactive still gets in at once."""
    assert bucket.take("d", "a", charges(5400), priority="interactive").status == "granted"
    assert bucket.take("d", "b", charges(100), priority="bulk").status == "wait"
    assert bucket.take("d", "c", charges(100), priority="default").status == "granted"
    assert bucket.take("d", "e", charges(500), priority="interactive").status == "granted"


def test_settling_returns_unused_tokens_once(bucket: Bucket, redis: redis_lib.Redis) -> None:
    bucket.take("d", "a", charges(5000), priority="interactive")
    assert bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 1200}))
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 0}))
    assert stored_levels(redis)["tokens"] == pytest.approx(6000 - 1200)


def test_an_under_estimate_is_taken_back(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """A call that used more than it reserved leaves the bucket in debt, paid back by refill."""
    bucket.take("d", "a", charges(5000), priority="interactive")
    bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 7000}))
    assert stored_levels(redis)["tokens"] == pytest.approx(-1000)
    wait = bucket.take("d", "b", charges(1000), priority="interactive")
    assert wait.status == "wait" and wait.wait_s == pytest.approx(20.0)


def test_a_reservation_whose_worker_died_stops_counting(bucket: Bucket, clock: list[float]) -> None:
    """Past its ttl, a reservation is dropped: settling it later gives nothing back."""
    bucket.take("d", "a", charges(100), priority="interactive")
    clock[0] += bucket.policy.reservation_ttl_s * 1000 + 1
    bucket.take("d", "b", charges(100), priority="interactive")
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 0, "tokens": 0}))


def test_the_provider_headers_pull_the_bucket_down(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """A lower real limit is learned; a lower remaining is followed (someone shares the key)."""
    bucket.take("d", "a", charges(100), priority="interactive")
    bucket.settle(
        "d",
        "a",
        charges(0),
        Settlement(
            used={"requests": 1, "tokens": 100},
            observed={
                "tokens": Observed(limit=3000, remaining=1000),
                "requests": Observed(limit=60, remaining=59),
            },
        ),
    )
    assert stored_levels(redis)["tokens"] == 1000
    assert redis.hget("headrace:{d}:bucket", "cap:tokens") == b"3000"
    refused = bucket.take("d", "b", charges(4000), priority="interactive")
    assert refused.status == "never" and refused.limit == 3000


def test_a_429_pauses_the_deployment_for_everyone_and_slows_it(
    bucket: Bucket, clock: list[float], redis: redis_lib.Redis
) -> None:
    bucket.take("d", "a", charges(100), priority="interactive")
    bucket.settle(
        "d", "a", charges(0), Settlement(used={"requests": 0, "tokens": 0}, rate_limited=True, pause_s=2.5)
    )
    paused = bucket.take("d", "b", charges(100), priority="interactive")
    assert paused.status == "wait" and paused.reason == "paused" and paused.wait_s == pytest.approx(2.5)
    clock[0] += 2500
    assert bucket.take("d", "b", charges(100), priority="interactive").status == "granted"
    factor = float(redis.hget("headrace:{d}:bucket", "factor") or 0)
    assert 0.7 <= factor < 0.73  # 0.7 after the 429, recovering 1% per second
    clock[0] += 60_000
    bucket.take("d", "c", charges(1), priority="interactive")
    assert float(redis.hget("headrace:{d}:bucket", "factor") or 0) == 1.0


def test_a_tenant_ceiling_holds_even_when_the_deployment_has_room(bucket: Bucket) -> None:
    ceiling = [Charge("requests", 2, 1), Charge("tokens", 1000, 400)]
    for rid in ("a", "b"):
        assert (
            bucket.take(
                "d", rid, charges(400), priority="interactive", tenant="acme", tenant_charges=ceiling
            ).status
            == "granted"
        )
    noisy = bucket.take("d", "c", charges(400), priority="interactive", tenant="acme", tenant_charges=ceiling)
    assert noisy.status == "wait" and noisy.reason == "requests"
    other = bucket.take(
        "d",
        "e",
        charges(400),
        priority="interactive",
        tenant="globex",
        tenant_charges=[Charge("requests", 2, 1), Charge("tokens", 1000, 400)],
    )
    assert other.status == "granted"
