"""Circuit breakers on a real Redis, with the scripts' test clock: open on a failure ratio or on
failures in a row, skip while open, let a few probes through when half-open, close on their
success."""

from __future__ import annotations

import pytest
import redis as redis_lib

from workers.breaker import Breaker, BreakerCall, BreakerPolicy, is_provider_failure
from workers.providers.base import CallFailed, ProviderReply, Usage

# Only the ratio here; the failures-in-a-row rule has its own test below.
POLICY = BreakerPolicy(
    window_s=30, min_calls=10, failure_ratio=0.5, open_s=15, probes=2, consecutive_failures=0
)


@pytest.fixture
def clock() -> list[float]:
    return [5_000_000.0]


@pytest.fixture
def breaker(redis: redis_lib.Redis, clock: list[float]) -> Breaker:
    return Breaker(redis, POLICY, clock_ms=lambda: clock[0])


def _calls(breaker: Breaker, clock: list[float], failures: int, successes: int) -> list[str]:
    transitions = []
    for i in range(failures + successes):
        clock[0] += 100
        transitions.append(breaker.record("d", f"c{clock[0]}-{i}", failed=i < failures, probe=False))
    return transitions


def test_it_stays_closed_until_enough_calls_say_so(breaker: Breaker, clock: list[float]) -> None:
    """9 failures out of 9 are not a verdict (fewer than min_calls); 4 of 10 stay under the ratio."""
    assert set(_calls(breaker, clock, 9, 0)) == {""}
    assert breaker.allow("d").allowed
    clock[0] += 31_000  # the window forgets them
    assert set(_calls(breaker, clock, 4, 6)) == {""} and breaker.allow("d").allowed


def test_it_opens_on_the_failure_ratio_and_requests_skip_it(
    breaker: Breaker, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    assert _calls(breaker, clock, 5, 5)[-1] == "opened"
    permit = breaker.allow("d")
    assert not permit.allowed and 14 < permit.wait_s <= 15
    assert "circuit breaker OPENED for deployment d" in caplog.text


def test_half_open_probes_close_it_or_open_it_again(breaker: Breaker, clock: list[float]) -> None:
    _calls(breaker, clock, 10, 0)
    clock[0] += 15_000
    first, second, third = (breaker.allow("d") for _ in range(3))
    assert first.probe and second.probe and not third.allowed  # two probes at a time
    assert breaker.record("d", "p1", failed=False, probe=True) == ""
    assert breaker.record("d", "p2", failed=False, probe=True) == "closed"
    assert breaker.allow("d").allowed and not breaker.allow("d").probe
    _calls(breaker, clock, 10, 0)
    clock[0] += 15_000
    third, fourth = breaker.allow("d"), breaker.allow("d")
    assert third.probe and fourth.probe
    # One failed probe is not enough: a provider that is back still fails a few calls at random.
    assert breaker.record("d", "p3", failed=True, probe=True) == ""
    assert breaker.record("d", "p4", failed=True, probe=True) == "opened"
    assert not breaker.allow("d").allowed


def test_one_failed_probe_among_successes_closes_it_anyway(breaker: Breaker, clock: list[float]) -> None:
    """Before: a single 500 from a provider back from an outage (5% of its calls fail anyway)
    reopened the breaker for another open period (+27 s of span in bench/rate_limits.py --faults)."""
    _calls(breaker, clock, 10, 0)
    clock[0] += 15_000
    assert breaker.allow("d").probe and breaker.allow("d").probe
    assert breaker.record("d", "p1", failed=True, probe=True) == ""
    assert breaker.allow("d").probe  # the failed one's place
    assert breaker.record("d", "p2", failed=False, probe=True) == ""
    assert breaker.record("d", "p3", failed=False, probe=True) == "closed"


def test_a_probe_lost_with_its_worker_does_not_wedge_half_open(breaker: Breaker, clock: list[float]) -> None:
    _calls(breaker, clock, 10, 0)
    clock[0] += 15_000
    assert breaker.allow("d").probe and breaker.allow("d").probe  # ...and both workers die
    assert not breaker.allow("d").allowed
    clock[0] += 15_001
    assert breaker.allow("d").probe


def test_only_the_providers_health_counts() -> None:
    """5xx, 529, timeouts and cut connections count; a 4xx or a 429 does not."""
    reply = ProviderReply(body={}, usage=Usage(1, 1), http_status=200)
    assert not is_provider_failure(reply)
    for status, failed in ((500, True), (503, True), (529, True), (400, False), (404, False), (429, False)):
        assert is_provider_failure(CallFailed("x", kind="status", status=status)) is failed
    assert is_provider_failure(CallFailed("x", kind="timeout"))
    assert is_provider_failure(CallFailed("x", kind="connection"))
    assert not is_provider_failure(CallFailed("x", kind="translation"))


def test_a_sudden_outage_opens_it_after_a_few_failures_in_a_row(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """20 successes fill the window; then the provider goes down. By the ratio alone it would take
    20 failures to open; five in a row open it, and one success resets the count."""
    breaker = Breaker(redis, BreakerPolicy(consecutive_failures=5), clock_ms=lambda: clock[0])
    assert set(_calls(breaker, clock, 0, 20)) == {""}
    assert set(_calls(breaker, clock, 4, 0)) == {""}
    assert set(_calls(breaker, clock, 0, 1)) == {""}  # the streak starts again
    assert _calls(breaker, clock, 5, 0) == ["", "", "", "", "opened"]
    assert not breaker.allow("d").allowed


def test_admission_asks_and_tells_the_breaker_in_the_buckets_own_step(
    redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The worker's way (one round trip each): a take on a deployment whose breaker is open takes
    no room; half-open, a take that must wait for room does not hold a probe's place (before, the
    permit was taken first and a waiting probe held its place for a whole open period); the
    settlement counts the call and reports the transition."""
    from workers.admission import Bucket, BucketPolicy, Charge, Settlement

    policy = BreakerPolicy(min_calls=2, failure_ratio=0.5, open_s=15, probes=1, consecutive_failures=0)
    bucket = Bucket(redis, BucketPolicy(first_call_s=0.0), clock_ms=lambda: clock[0], breaker=policy)
    breaker = Breaker(redis, policy, clock_ms=lambda: clock[0])
    small, large = [Charge("requests", 60, 1), Charge("tokens", 6000, 100)], [Charge("tokens", 6000, 5000)]

    def take(rid: str, charges: list[Charge]) -> str:
        admission = bucket.take("d", rid, charges, priority="interactive", ttl_s=60)
        return "probe" if admission.probe else admission.status

    def settle(rid: str, failed: bool, probe: bool = False) -> str:
        used, call = Settlement(used={"requests": 1, "tokens": 10}), BreakerCall(rid, failed, probe)
        return bucket.settle("d", rid, small, used, call=call).transition

    assert take("big", large) == "granted"  # most of the bucket, kept in flight
    assert take("a", small) == "granted" and take("b", small) == "granted"
    assert settle("a", failed=True) == "" and settle("b", failed=True) == "opened"
    assert take("c", small) == "open"
    assert not redis.hexists("headrace:{d}:resv", "c")  # nothing taken
    clock[0] += 15_000  # half-open: one probe at a time
    assert take("waits", large) == "wait"  # no room: no probe's place taken
    assert take("p", small) == "probe"
    assert breaker.allow("d").allowed is False  # the one place is the probe's
    assert settle("p", failed=False, probe=True) == "closed"
    assert take("after", small) == "granted"
