"""The bucket scripts on a real Redis, against a simple reference model (hypothesis drives both),
with the scripts' test-only clock so that time is exact. The model is compared with what
``read_state`` shows, so the read script (what people see) is held to the same model as the
scripts that decide."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import redis as redis_lib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker_config.bucket_state import read_state
from broker_config.deployments import Deployment
from workers.admission import (
    Admission,
    Bucket,
    BucketPolicy,
    Charge,
    Estimate,
    Observed,
    Settlement,
    Ticket,
    admit,
    settle,
)

LIMITS = {"requests": 60, "tokens": 6000}
DEPLOYMENT = Deployment(name="d", provider="openai", model="m", rpm=60, tpm=6000)
FLOORS = {"interactive": 0.0, "default": 0.05, "bulk": 0.10}
TTL_S = 45.0  # short, so that the property tests see reservations expire
# Far enough from zero that no run of backward steps takes the clock below it (Redis's is ~1.7e12).
START_MS = 1e9


@dataclass
class Model:
    """A token bucket per limit, the way prelude.lua describes it, in plain Python: levels as of
    the last write, refilled continuously since, on a clock that never runs backwards (a clock
    behind the last write counts as the last write's time). Reservations expire after a ttl."""

    limits: dict[str, int]
    ttl_ms: float
    ts: float | None = None  # when levels were last written
    stored: dict[str, float] = field(default_factory=dict)
    held: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)  # id: (expiry, costs)

    def now(self, clock: float) -> float:
        return clock if self.ts is None else max(clock, self.ts)

    def level(self, name: str, clock: float) -> float:
        cap = self.limits[name]
        if self.ts is None:
            return float(cap)
        return min(cap, self.stored[name] + (self.now(clock) - self.ts) * cap / 60000)

    def in_flight(self, name: str, clock: float) -> float:
        return sum(c[name] for expiry, c in self.held.values() if expiry > self.now(clock))

    def _write(self, levels: dict[str, float], clock: float) -> None:
        self.ts, self.stored = self.now(clock), levels

    def take(self, rid: str, costs: dict[str, float], floor: float, clock: float) -> tuple[str, float]:
        now = self.now(clock)
        self.held = {r: h for r, h in self.held.items() if h[0] > now}  # a dead worker's stop counting
        if any(cost > self.limits[n] for n, cost in costs.items()):
            return "never", 0.0
        levels = {name: self.level(name, clock) for name in self.limits}
        wait = 0.0
        for name, cost in costs.items():
            cap = self.limits[name]
            need = min(cost + floor * cap, cap)
            if levels[name] < need:
                wait = max(wait, (need - levels[name]) * 60000 / cap)
        if wait > 0:
            return "wait", wait
        self._write({name: levels[name] - costs[name] for name in self.limits}, clock)
        self.held[rid] = (now + self.ttl_ms, dict(costs))
        return "granted", 0.0

    def settle(self, rid: str, used: dict[str, float], clock: float) -> None:
        levels = {name: self.level(name, clock) for name in self.limits}
        held = self.held.pop(rid, None)
        if held is not None:
            for name, cost in held[1].items():
                levels[name] = min(self.limits[name], levels[name] + cost - used[name])
        self._write(levels, clock)


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


@pytest.fixture
def bucket(redis: redis_lib.Redis, clock: list[float]) -> Bucket:
    return Bucket(redis, clock_ms=lambda: clock[0])


def charges(tokens: float, limits: dict[str, int] = LIMITS) -> list[Charge]:
    return [Charge("requests", limits["requests"], 1), Charge("tokens", limits["tokens"], tokens)]


def take(
    bucket: Bucket, rid: str, tokens: float, priority: str = "interactive", **kwargs: object
) -> Admission:
    return bucket.take("d", rid, charges(tokens), priority=priority, ttl_s=TTL_S, **kwargs)  # type: ignore[arg-type]


def stored_levels(client: redis_lib.Redis) -> dict[str, float]:
    raw = client.hgetall("headrace:{d}:bucket")
    return {k.decode()[4:]: float(v) for k, v in raw.items() if k.startswith(b"lvl:")}


# The clock mostly moves forward, and sometimes steps back (a failover to a replica behind).
clock_step = st.one_of(st.floats(0, 20_000), st.floats(-90_000, 0))
operation = st.one_of(
    st.tuples(st.just("take"), clock_step, st.integers(0, 7000), st.sampled_from(list(FLOORS))),
    st.tuples(st.just("settle"), clock_step, st.integers(0, 30), st.integers(0, 3000)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
def test_the_scripts_agree_with_the_reference_model(
    ops: list[tuple[str, float, int, object]], redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Grant, wait and never exactly when the model does; what read_state shows (levels, what is in
    flight, how far the clock is behind) equals the model after every step, settlements, expired
    reservations and a clock stepping back included."""
    redis.flushdb()
    clock[0] = START_MS  # hypothesis reuses the fixture across examples
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    model = Model(dict(LIMITS), TTL_S * 1000)
    granted: list[str] = []
    for step, (kind, advance, amount, extra) in enumerate(ops):
        clock[0] += advance
        if kind == "take":
            rid = f"r{step}"
            expected, wait = model.take(rid, {"requests": 1, "tokens": amount}, FLOORS[str(extra)], clock[0])
            got = take(bucket, rid, amount, str(extra))
            assert got.status == expected, (step, got, expected)
            if expected == "wait":
                assert got.wait_s * 1000 == pytest.approx(math.ceil(wait), abs=1)
            if expected == "granted":
                granted.append(rid)
        else:
            rid = granted[int(amount) % len(granted)] if granted else "none"
            used = {"requests": 1.0, "tokens": float(extra)}  # type: ignore[arg-type]
            model.settle(rid, used, clock[0])
            bucket.settle("d", rid, charges(0), Settlement(used=used))
        shown = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
        for limit in shown.limits:
            assert limit.level == pytest.approx(model.level(limit.name, clock[0]), abs=1e-6), (step, limit)
            assert limit.in_flight == pytest.approx(model.in_flight(limit.name, clock[0])), (step, limit)
        behind_ms = max(0.0, (model.ts or clock[0]) - clock[0])
        assert shown.clock_behind_s * 1000 == pytest.approx(behind_ms, abs=1e-6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(takes=st.lists(st.tuples(clock_step, st.integers(1, 2500)), min_size=5, max_size=60))
def test_never_grants_more_than_the_limit_allows_in_any_window(
    takes: list[tuple[float, int]], redis: redis_lib.Redis, clock: list[float]
) -> None:
    """In every window [a, b] of the bucket's own clock: granted tokens <= capacity + refill over
    (b - a), even when Redis's clock steps back and forth."""
    redis.flushdb()
    clock[0] = START_MS
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    grants: list[tuple[float, int]] = []
    for i, (advance, tokens) in enumerate(takes):
        clock[0] += advance
        if take(bucket, f"r{i}", tokens).status == "granted":
            # The bucket's clock: never before its last grant.
            grants.append((max(clock[0], grants[-1][0] if grants else clock[0]), tokens))
    cap, rate = LIMITS["tokens"], LIMITS["tokens"] / 60000
    for i, (start, _) in enumerate(grants):
        total = 0
        for end, tokens in grants[i:]:
            total += tokens
            assert total <= cap + rate * (end - start) + 1e-6


def test_refill_is_continuous_not_a_minute_reset(bucket: Bucket, clock: list[float]) -> None:
    """Empty the bucket; the advertised wait is exact: a millisecond early is still too early."""
    assert take(bucket, "a", 6000).status == "granted"
    waiting = take(bucket, "b", 600)
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(6.0)
    clock[0] += 5999
    assert take(bucket, "b", 600).status == "wait"
    clock[0] += 1
    assert take(bucket, "b", 600).status == "granted"


def test_a_request_larger_than_the_limit_is_refused_for_good(bucket: Bucket) -> None:
    refused = take(bucket, "a", 6001)
    assert (refused.status, refused.reason, refused.limit) == ("never", "tokens", 6000)


def test_bulk_leaves_a_share_for_interactive(bucket: Bucket) -> None:
    """With 10% of the bucket left, bulk waits and interactive still gets in at once."""
    assert take(bucket, "a", 5400).status == "granted"
    assert take(bucket, "b", 100, "bulk").status == "wait"
    assert take(bucket, "c", 100, "default").status == "granted"
    assert take(bucket, "e", 500).status == "granted"


def test_settling_returns_unused_tokens_once(bucket: Bucket, redis: redis_lib.Redis) -> None:
    take(bucket, "a", 5000)
    assert bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 1200}))
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 0}))
    assert stored_levels(redis)["tokens"] == pytest.approx(6000 - 1200)


def test_an_under_estimate_is_taken_back(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """A call that used more than it reserved leaves the bucket in debt, paid back by refill."""
    take(bucket, "a", 5000)
    bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 7000}))
    assert stored_levels(redis)["tokens"] == pytest.approx(-1000)
    wait = take(bucket, "b", 1000)
    assert wait.status == "wait" and wait.wait_s == pytest.approx(20.0)


def test_a_reservation_whose_worker_died_stops_counting(bucket: Bucket, clock: list[float]) -> None:
    """Past its ttl, a reservation is dropped: settling it later gives nothing back."""
    take(bucket, "a", 100)
    clock[0] += TTL_S * 1000 + 1
    take(bucket, "b", 100)
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 0, "tokens": 0}))


def test_a_reservation_outlives_its_deployments_own_timeout(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """A deployment whose calls may run 600 s (timeout_s = 600) while the default is 60 s: a call
    that takes 610 s is still settled, its refund given and its under-estimate charged; the
    reservation expires only after its own timeouts and the margin."""
    policy = BucketPolicy(call_timeout_s=60, connect_timeout_s=5, reservation_margin_s=60)
    bucket = Bucket(redis, policy, clock_ms=lambda: clock[0])
    slow = DEPLOYMENT.model_copy(update={"timeout_s": 600.0})
    assert policy.reservation_ttl_s(slow) == 600 + 5 + 60
    assert policy.reservation_ttl_s(DEPLOYMENT) == 60 + 5 + 60

    def reserve(request_id: str, deployment: Deployment = slow) -> Ticket:
        ticket = admit(
            bucket,
            deployment,
            Estimate(100, 900),
            request_id=request_id,
            priority="interactive",
            tenant=None,
            max_inline_wait_s=0,
            sleep=lambda _s: None,
        )
        assert isinstance(ticket, Ticket)
        return ticket

    first = reserve("a")
    clock[0] += 610_000  # the call runs 610 s; meanwhile other calls take (and sweep stale ones)
    reserve("b")
    assert settle(bucket, first, Settlement(used={"requests": 1, "tokens": 1500}))
    shown = read_state(redis, slow, clock_ms=lambda: clock[0])
    assert [limit.level for limit in shown.limits] == [59, 6000 - 1000 - 500]  # b's take, a's debt
    clock[0] += 665_001  # past b's ttl, counted from its grant
    reserve("c")
    assert read_state(redis, slow, clock_ms=lambda: clock[0]).in_flight_calls == 1  # only c
    # The keys live at least as long as the longest reservation in them.
    reserve("d", DEPLOYMENT.model_copy(update={"timeout_s": 7200.0}))
    assert redis.pttl("headrace:{d}:resv") > 7200_000


@pytest.mark.slow
def test_settle_never_raises_when_redis_is_gone(clock: list[float]) -> None:
    """The paid call's ledger row must not depend on the bucket: an unreachable Redis loses only
    the refund."""
    gone = redis_lib.Redis(port=1, socket_connect_timeout=0.2)
    bucket = Bucket(gone, clock_ms=lambda: clock[0])
    ticket = Ticket(DEPLOYMENT, "a", charges(1), None, [])
    assert settle(bucket, ticket, Settlement(used={"requests": 1, "tokens": 1})) is False


def test_the_provider_headers_pull_the_bucket_down(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """A lower real limit is learned; a lower remaining is followed (someone shares the key)."""
    take(bucket, "a", 100)
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
    refused = take(bucket, "b", 4000)
    assert refused.status == "never" and refused.limit == 3000
    tokens = next(
        limit
        for limit in read_state(redis, DEPLOYMENT, clock_ms=lambda: 1_000_000.0).limits
        if limit.name == "tokens"
    )
    assert (tokens.configured, tokens.learned, tokens.effective) == (6000, 3000, 3000)


def test_a_429_pauses_the_deployment_for_everyone_and_slows_it(
    bucket: Bucket, clock: list[float], redis: redis_lib.Redis
) -> None:
    take(bucket, "a", 100)
    bucket.settle(
        "d", "a", charges(0), Settlement(used={"requests": 0, "tokens": 0}, rate_limited=True, pause_s=2.5)
    )
    paused = take(bucket, "b", 100)
    assert paused.status == "wait" and paused.reason == "paused" and paused.wait_s == pytest.approx(2.5)
    shown = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
    assert shown.paused_for_s == pytest.approx(2.5) and shown.rate_factor == pytest.approx(0.7)
    clock[0] += 2500
    assert take(bucket, "b", 100).status == "granted"
    factor = float(redis.hget("headrace:{d}:bucket", "factor") or 0)
    assert 0.7 <= factor < 0.73  # 0.7 after the 429, recovering 1% per second
    clock[0] += 60_000
    take(bucket, "c", 1)
    assert float(redis.hget("headrace:{d}:bucket", "factor") or 0) == 1.0


def test_a_tenant_ceiling_holds_even_when_the_deployment_has_room(bucket: Bucket) -> None:
    ceiling = [Charge("requests", 2, 1), Charge("tokens", 1000, 400)]
    for rid in ("a", "b"):
        assert take(bucket, rid, 400, tenant="acme", tenant_charges=ceiling).status == "granted"
    noisy = take(bucket, "c", 400, tenant="acme", tenant_charges=ceiling)
    assert noisy.status == "wait" and noisy.reason == "requests"
    other = take(bucket, "e", 400, tenant="globex", tenant_charges=ceiling)
    assert other.status == "granted"
