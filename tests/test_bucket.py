"""The bucket scripts on a real Redis, against a simple reference model (hypothesis drives both),
with the scripts' test-only clock so that time is exact. The model is compared with what
``read_state`` shows, so the read script (what people see) is held to the same model as the
scripts that decide."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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
    Forecast,
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


LIFT_MS = BucketPolicy().floor_lift_s * 1000
FLOOR_RECHECK_MS = 500  # bucket_take.lua's wait_ms
LEARNED_MS = 600_000  # a learned shape (and limit) holds for 10 minutes
SLACK_MS = 2500  # a forecast further than this (+5%) from a token bucket's is stepped
SAME_MOMENT_MS = 3000  # answers settled this much apart may tell one moment
MIN_DRAIN_MS = 1000  # a drain shorter than this tells no pace
PACED_LAG_MS = 250  # room that comes back at a pace does so from this long after its moment...
FIRST_CALL_MS = BucketPolicy().first_call_s * 1000  # a new bucket's refill starts this late
IDLE_MS = BucketPolicy().floor_idle_s * 1000  # a continuous limit's floor is lent after this


def back(x: float, gain: float, pace: float, rate: float, lag: float) -> float:
    """What a limit has got back x ms after a stepped forecast's moment (prelude.lua)."""
    x -= lag
    if x < 0:
        return 0.0
    if pace <= 0:
        return gain + x * rate
    if x * pace <= gain:
        return x * pace
    return gain + (x - gain / pace) * rate


@dataclass
class Model:
    """A token bucket per limit, the way prelude.lua describes it, in plain Python: levels as of
    the last write, refilled continuously since, on a clock that never runs backwards (a clock
    behind the last write counts as the last write's time). Reservations expire after a ttl.

    Forecasts: an answer's (remaining, reset) that a token bucket would not give marks the limit
    stepped; a stepped limit's level is then kept within the provider's remaining less what it
    may not have counted (at least: calls taken after the one answered still in flight; at most:
    all taken after it, and every call in flight when it was taken; and, up to the lowest
    remaining told of the pending moment less every call in flight now), and gets nothing back until
    the reset's moment; then what the provider lacked comes back at the pace the busy period
    drained it (at once without one), then continuous refill. A stepped limit's window holds the
    most room an answer showed counting the answered call (learned afresh when the steps begin):
    floors and what comes back are shares of it. Floors are lent out from LIFT_MS before that
    moment until that is back; a continuous limit's floors are lent while no priority above them
    has asked for IDLE_MS."""

    limits: dict[str, int]
    ttl_ms: float
    ts: float | None = None  # when levels were last written
    stored: dict[str, float] = field(default_factory=dict)
    # id: (taken at, expiry, costs, each limit's running totals of takes and of ended charges as of it)
    held: dict[str, tuple[float, float, dict[str, float], dict[str, float], dict[str, float]]] = field(
        default_factory=dict
    )
    totals: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)  # charges of reservations settled or expired
    low: dict[str, float] = field(default_factory=dict)  # lowest remaining told of the pending moment
    untold: dict[str, float] = field(default_factory=dict)  # charges of calls ended without telling since
    told: dict[str, float] = field(default_factory=dict)  # when the pending moment was first told
    forecast: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # moment, gain, pace
    step_seen: dict[str, float] = field(default_factory=dict)
    drain: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # since, total then, pace
    peak: dict[str, float] = field(default_factory=dict)  # the most room an answer showed (a window's)
    whole: set[str] = field(default_factory=set)  # ...unless it has shown that it comes back at once
    asked: dict[float, float] = field(default_factory=dict)  # floor -> when a priority with it last asked

    def now(self, clock: float) -> float:
        return clock if self.ts is None else max(clock, self.ts)

    def level(self, name: str, clock: float) -> float:
        cap = self.limits[name]
        if self.ts is None:
            return float(cap)
        now, since, rate = self.now(clock), self.ts, cap / 60000
        refilled = self.stored[name] + (now - since) * rate
        if name in self.forecast and now > since:
            ret, gain, pace = self.forecast[name]
            lag = self.lag(name)
            refilled = (
                self.stored[name]
                + back(now - ret, gain, pace, rate, lag)
                - back(since - ret, gain, pace, rate, lag)
            )
        return min(cap, refilled)

    def lag(self, name: str) -> float:
        pace = self.forecast[name][2]
        return PACED_LAG_MS if pace > 0 and name not in self.whole else 0.0

    def stepped(self, name: str, now: float) -> bool:
        return now - self.step_seen.get(name, -LEARNED_MS) < LEARNED_MS

    def window(self, name: str, now: float) -> float:
        """The room one window holds: the peak while stepped, else the whole limit."""
        cap = self.limits[name]
        return min(cap, self.peak[name]) if self.stepped(name, now) and name in self.peak else cap

    def lifted(self, name: str, now: float) -> bool:
        if name not in self.forecast:
            return False
        ret, gain, pace = self.forecast[name]
        return ret - LIFT_MS <= now < (ret + self.lag(name) + gain / pace if pace > 0 else ret)

    def wait(self, name: str, now: float, lvl: float, cost: float, need: float) -> float:
        cap = self.limits[name]
        if name not in self.forecast:
            return (need - lvl) * 60000 / cap
        ret, gain, pace = self.forecast[name]
        if now < ret - LIFT_MS and lvl >= cost:
            if self.held:  # calls in flight may show the room was there: look again soon
                return min(ret - LIFT_MS - now, FLOOR_RECHECK_MS)
            return ret - LIFT_MS - now
        y = need - lvl + back(now - ret, gain, pace, cap / 60000, self.lag(name))
        if y <= gain:
            x = y / pace if pace > 0 else 0.0
        else:
            x = (gain / pace if pace > 0 else 0.0) + (y - gain) / (cap / 60000)
        return max(ret + self.lag(name) + x - now, 0.0)

    def in_flight(self, name: str, clock: float) -> float:
        return sum(c[name] for _, expiry, c, *_ in self.held.values() if expiry > self.now(clock))

    def _end(self, costs: dict[str, float]) -> None:
        for name, cost in costs.items():
            self.ended[name] = self.ended.get(name, 0.0) + cost

    def _write(self, levels: dict[str, float], clock: float) -> None:
        self.ts, self.stored = self.now(clock), levels

    def take(self, rid: str, costs: dict[str, float], floor: float, clock: float) -> tuple[str, float]:
        now = self.now(clock)
        self.asked[floor] = now
        wanted = any(now - at < IDLE_MS for other, at in self.asked.items() if other < floor)
        for rid_, h in list(self.held.items()):
            if h[1] <= now:  # a dead worker's reservation stops counting
                self._end(self.held.pop(rid_)[2])
        if any(cost > self.limits[n] for n, cost in costs.items()):
            return "never", 0.0
        levels = {name: self.level(name, clock) for name in self.limits}
        wait = 0.0
        for name, cost in costs.items():
            cap, lvl = self.limits[name], levels[name]
            if self.stepped(name, now):  # lent just before the window's room comes back
                share = 0.0 if self.lifted(name, now) else floor
            else:  # lent while no priority above has asked lately
                share = floor if wanted else 0.0
            need = min(cost + share * self.window(name, now), cap)
            if lvl < need:
                wait = max(wait, self.wait(name, now, lvl, cost, need))
        if wait > 0:
            return "wait", wait
        # A new bucket starts its refill FIRST_CALL_MS late, as the provider's does (bucket_take.lua).
        late = {
            name: FIRST_CALL_MS * cap / 60000 if self.ts is None else 0.0 for name, cap in self.limits.items()
        }
        self._write({name: levels[name] - costs[name] - late[name] for name in self.limits}, clock)
        for name in costs:
            if levels[name] >= 0.9 * self.limits[name]:  # a busy period begins
                self.drain[name] = (now, self.totals.get(name, 0.0), 0.0)
        for name, cost in costs.items():
            self.totals[name] = self.totals.get(name, 0.0) + cost
            if name in self.drain:
                since, then, pace = self.drain[name]
                recent = (self.totals[name] - then) / max(now - since, MIN_DRAIN_MS)
                self.drain[name] = (since, then, max(pace, recent))
        ended = {name: self.ended.get(name, 0.0) for name in costs}
        self.held[rid] = (now, now + self.ttl_ms, dict(costs), dict(self.totals), ended)
        return "granted", 0.0

    def settle(
        self, rid: str, used: dict[str, float], clock: float, said: dict[str, tuple[int, int]] | None = None
    ) -> None:
        """``said``: per limit, the provider's (remaining, reset ms) at the configured limit."""
        now = self.now(clock)
        levels = {name: self.level(name, clock) for name in self.limits}
        held = self.held.pop(rid, None)
        if held is not None:
            self._end(held[2])
            for name, cost in held[2].items():
                levels[name] = min(self.limits[name], levels[name] + cost - used[name])
        for name in self.limits:
            if name not in (said or {}) and held is not None:
                self.untold[name] = self.untold.get(name, 0.0) + held[2][name]  # may have been counted
        for name, (remaining, reset_ms) in (said or {}).items():
            cap = self.limits[name]
            continuous = max(0, cap - remaining) * 60000 / cap
            was_stepped = self.stepped(name, now)
            if abs(reset_ms - continuous) > SLACK_MS + 0.05 * continuous:
                self.step_seen[name] = now
            if self.stepped(name, now):
                shown = remaining + (held[2][name] if held is not None else 0.0)
                if not was_stepped or name not in self.peak or shown > self.peak[name]:
                    self.peak[name] = shown
                least, most = 0.0, math.inf
                if held is not None:
                    after = max(0.0, self.totals[name] - held[3][name])
                    in_flight_then = max(0.0, held[3][name] - held[2][name] - held[4][name])
                    least = sum(c[name] for at, _, c, *_ in self.held.values() if at > held[0])
                    most = after + in_flight_then
                levels[name] = min(levels[name], remaining - least)
                if levels[name] < remaining - most:
                    levels[name] = min(cap, remaining - most)
                pending, pending_gain, _ = self.forecast.get(name, (0.0, 0.0, 0.0))
                room = self.window(name, now)
                just_after = held is not None and 0 < pending <= held[0] < pending + 4 * PACED_LAG_MS
                if held is not None and just_after and pending_gain >= 0.5 * room:
                    if remaining + held[2][name] >= 0.5 * room:
                        self.whole.add(name)
                    else:
                        self.whole.discard(name)
                moment = now + reset_ms
                if now < pending < moment <= pending + SAME_MOMENT_MS:
                    moment = pending  # the same moment, told by an answer settled later
                new_moment = abs(moment - pending) > SAME_MOMENT_MS
                fresh = held is not None and held[0] >= self.told.get(name, 0.0)
                stale = pending > 0 and new_moment and not fresh
                if name not in self.low or (new_moment and not stale):
                    self.low[name], self.untold[name] = remaining, 0.0
                self.low[name] = min(self.low[name], remaining)
                in_flight = sum(c[name] for _, _, c, *_ in self.held.values())
                surely = self.low[name] - self.untold.get(name, 0.0) - in_flight
                if levels[name] < surely:
                    levels[name] = min(cap, surely)
                if not stale:
                    pace = self.drain[name][2] if name in self.drain else 0.0
                    self.forecast[name] = (moment, max(0, self.window(name, now) - remaining), pace)
                    if new_moment:
                        self.told[name] = now
            else:
                self.forecast.pop(name, None)
                self.whole.discard(name)
                levels[name] = min(levels[name], remaining)  # answered now: its refill since is 0
                if levels[name] > remaining + 0.02 * cap:
                    levels[name] = remaining
        self._write(levels, clock)


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


# The unit tests below count exactly from a full bucket; the property tests keep the default
# (a new bucket refills FIRST_CALL_MS late) and the model does the same.
EXACT = BucketPolicy(first_call_s=0.0)


@pytest.fixture
def bucket(redis: redis_lib.Redis, clock: list[float]) -> Bucket:
    return Bucket(redis, EXACT, clock_ms=lambda: clock[0])


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
# What an answer's headers say of the tokens limit: nothing, a token bucket's forecast (its time to
# full, give or take rounding), or any other (room coming back at a moment).
forecast = st.one_of(
    st.none(),
    st.tuples(st.just("continuous"), st.integers(0, 6000), st.floats(-500, 500)),
    st.tuples(st.just("stepped"), st.integers(0, 6000), st.floats(0, 70_000)),
)
operation = st.one_of(
    st.tuples(st.just("take"), clock_step, st.integers(0, 7000), st.sampled_from(list(FLOORS))),
    st.tuples(st.just("settle"), clock_step, st.integers(0, 30), st.integers(0, 3000), forecast),
)


def said_by(told: tuple[str, int, float] | None) -> dict[str, tuple[int, int]]:
    if told is None:
        return {}
    kind, remaining, reset = told
    if kind == "continuous":
        reset += (LIMITS["tokens"] - remaining) * 60000 / LIMITS["tokens"]
    return {"tokens": (remaining, max(0, round(reset)))}


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
def test_the_scripts_agree_with_the_reference_model(
    ops: list[tuple[Any, ...]], redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Grant, wait and never exactly when the model does; what read_state shows (levels, what is in
    flight, how far the clock is behind, the shape, when held room comes back) equals the model
    after every step, settlements with and without forecasts, expired reservations and a clock
    stepping back included."""
    redis.flushdb()
    clock[0] = START_MS  # hypothesis reuses the fixture across examples
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    model = Model(dict(LIMITS), TTL_S * 1000)
    granted: list[str] = []
    for step, (kind, advance, amount, extra, *told) in enumerate(ops):
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
            used = {"requests": 1.0, "tokens": float(extra)}
            said = said_by(told[0])
            model.settle(rid, used, clock[0], said)
            observed = {n: Forecast(LIMITS[n], r, reset / 1000) for n, (r, reset) in said.items()}
            bucket.settle("d", rid, charges(0), Settlement(used=used, observed=observed))
        shown = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
        now = model.now(clock[0])
        for limit in shown.limits:
            assert limit.level == pytest.approx(model.level(limit.name, clock[0]), abs=1e-6), (step, limit)
            assert limit.in_flight == pytest.approx(model.in_flight(limit.name, clock[0])), (step, limit)
            stepped = now - model.step_seen.get(limit.name, -LEARNED_MS) < LEARNED_MS
            assert limit.shape == ("steps" if stepped else "continuous"), (step, limit)
            ret = model.forecast.get(limit.name, (0.0, 0.0, 0.0))[0]
            assert limit.room_back_in_s * 1000 == pytest.approx(max(0.0, ret - now), abs=1e-6), (step, limit)
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


def test_a_new_bucket_refills_from_when_its_first_call_reaches_the_provider(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The provider's bucket starts refilling when the first call reaches it, a little after our
    first take. Before: ours refilled from the take, ran ahead of the provider's by that much for
    good, and a burst that emptied both met 429s (4 of 600 calls on the simulator's token bucket
    at interactive priority; none since)."""
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    assert take(bucket, "a", 5400).status == "granted"
    late = BucketPolicy().first_call_s * 6000 / 60  # tokens the provider has not refilled yet
    assert stored_levels(redis)["tokens"] == pytest.approx(6000 - 5400 - late)
    waiting = take(bucket, "b", 600)
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(late / 100, abs=0.001)


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


def test_a_floor_is_lent_out_while_nobody_above_it_asks(bucket: Bucket, clock: list[float]) -> None:
    """A bulk batch alone gets the whole limit (before: it ran at 90% of it, 17% over the ideal
    span at default priority); the floor is back from the moment an interactive request asks,
    and lent again once none has asked for floor_idle_s."""
    assert take(bucket, "a", 5400, "bulk").status == "granted"
    assert take(bucket, "b", 550, "bulk").status == "granted"  # 50 left: nobody above asked
    waiting = take(bucket, "c", 500)
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(4.5)  # its own cost only
    clock[0] += 6000  # 650 back: the interactive request asked 6 s ago, its floor holds
    assert take(bucket, "d", 100, "bulk").status == "wait"  # 100 + 600 of floor > 650
    assert take(bucket, "c", 500).status == "granted"
    clock[0] += IDLE_MS
    assert take(bucket, "d", 3100, "bulk").status == "granted"  # 3150 back; 3100 + 600 would wait


def test_settling_returns_unused_tokens_once(bucket: Bucket, redis: redis_lib.Redis) -> None:
    take(bucket, "a", 5000)
    assert bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 1200})).found
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 1, "tokens": 0})).found
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
    assert not bucket.settle("d", "a", charges(0), Settlement(used={"requests": 0, "tokens": 0})).found


def test_a_reservation_outlives_its_deployments_own_timeout(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """A deployment whose calls may run 600 s (timeout_s = 600) while the default is 60 s: a call
    that takes 610 s is still settled, its refund given and its under-estimate charged; the
    reservation expires only after its own timeouts and the margin."""
    policy = BucketPolicy(call_timeout_s=60, connect_timeout_s=5, reservation_margin_s=60, first_call_s=0.0)
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
    assert settle(bucket, first, Settlement(used={"requests": 1, "tokens": 1500})).found
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
    bucket = Bucket(gone, EXACT, clock_ms=lambda: clock[0])
    ticket = Ticket(DEPLOYMENT, "a", charges(1), None, [])
    assert settle(bucket, ticket, Settlement(used={"requests": 1, "tokens": 1})).found is False


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
                "tokens": Forecast(limit=3000, remaining=1000),
                "requests": Forecast(limit=60, remaining=59),
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
