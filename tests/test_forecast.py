"""The provider's headers as a forecast: how they are read (on the provider's own clock), and what
the bucket does with them on a real Redis with the scripts' test-only clock: a token bucket's
forecast changes nothing, a window's holds the level until its moment and resumes the pool then,
and a 429 costs one drop of the rate factor per burst, recovered as soon as answers show room."""

from __future__ import annotations

import pytest
import redis as redis_lib

from broker_config.bucket_state import read_state
from broker_config.deployments import Deployment
from workers.admission import Admission, Bucket, BucketPolicy, Charge, Forecast, Settlement
from workers.forecast import forecasts, go_duration_s, seconds_until

DEPLOYMENT = Deployment(name="d", provider="openai", model="m", rpm=60, tpm=6000)
CLAUDE = Deployment(name="c", provider="anthropic", model="m", rpm=50, itpm=20000, otpm=8000)
START_MS = 1e9


@pytest.fixture
def clock() -> list[float]:
    return [START_MS]


@pytest.fixture
def bucket(redis: redis_lib.Redis, clock: list[float]) -> Bucket:
    return Bucket(redis, BucketPolicy(first_call_s=0.0), clock_ms=lambda: clock[0])  # exact arithmetic


def take(bucket: Bucket, rid: str, tokens: float, priority: str = "interactive") -> Admission:
    charges = [Charge("requests", 60, 1), Charge("tokens", 6000, tokens)]
    return bucket.take("d", rid, charges, priority=priority, ttl_s=120)


def answer(
    bucket: Bucket,
    rid: str,
    used: float,
    remaining: int,
    reset_s: float,
    *,
    limited: bool = False,
    pause_s: float = 0,
    age_s: float = 0,
) -> None:
    """Settle ``rid`` with an answer whose tokens headers say (6000, remaining, reset_s)."""
    charges = [Charge("requests", 60, 1), Charge("tokens", 6000, 0)]
    said = {"tokens": Forecast(6000, remaining, reset_s)}
    amounts = {"requests": 0 if limited else 1, "tokens": 0 if limited else used}
    bucket.settle(
        "d",
        rid,
        charges,
        Settlement(amounts, observed=said, rate_limited=limited, pause_s=pause_s, age_s=age_s),
    )


def tokens_state(redis: redis_lib.Redis, clock: list[float]) -> tuple[float, str, float, float]:
    state = read_state(redis, DEPLOYMENT, clock_ms=lambda: clock[0])
    limit = next(limit for limit in state.limits if limit.name == "tokens")
    return limit.level, limit.shape, limit.room_back_in_s, state.rate_factor


# --- reading the headers ------------------------------------------------------------------------


def test_openai_resets_are_go_durations() -> None:
    assert [go_duration_s(text) for text in ("6m0s", "1.2s", "20ms", "1h2m3.5s", "0s")] == [
        360,
        1.2,
        0.02,
        3723.5,
        0,
    ]
    assert [go_duration_s(text) for text in ("", "soon", "5", "-1s", None)] == [None] * 5
    headers = {
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "10",
        "x-ratelimit-reset-tokens": "59.9s",
    }
    assert forecasts(DEPLOYMENT, headers) == {"tokens": Forecast(6000, 10, 59.9)}


def test_anthropic_resets_are_read_against_the_answers_own_date() -> None:
    """The reset is a time; the duration is taken on the provider's clock (its Date header), so a
    provider whose clock is an hour off ours gives the same forecast."""
    headers = {
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "0",
        "anthropic-ratelimit-output-tokens-reset": "2031-05-01T10:00:42Z",
        "date": "Thu, 01 May 2031 10:00:12 GMT",
    }
    assert forecasts(CLAUDE, headers)["output_tokens"] == Forecast(8000, 0, 30.0)
    assert seconds_until("2031-05-01T10:00:12+00:00", "Thu, 01 May 2031 10:00:42 GMT") == 0.0
    without_date = {k: v for k, v in headers.items() if k != "date"}
    assert forecasts(CLAUDE, without_date)["output_tokens"] == Forecast(8000, 0, None)
    assert seconds_until("yesterday", headers["date"]) is None


# --- a token bucket's forecast changes nothing ------------------------------------------------


def test_a_token_buckets_forecast_keeps_the_continuous_refill(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    assert take(bucket, "a", 5000).status == "granted"
    answer(bucket, "a", 5000, 1000, 50.0)  # (6000 - 1000) / 100 per second: a token bucket's 50 s
    assert tokens_state(redis, clock)[:3] == (pytest.approx(1000), "continuous", 0.0)
    waiting = take(bucket, "b", 2000)
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(10.0)
    clock[0] += 10_000
    assert take(bucket, "b", 2000).status == "granted"


# --- a window's forecast holds the level until its moment ----------------------------------------


def test_a_windows_forecast_holds_the_level_and_resumes_the_pool_at_its_moment(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Remaining 1000 with the room back in 30 s is no token bucket (it would be back in 50 s):
    nothing refills until then; from then the room comes back as fast as this busy period took
    it (5000 within its first second: 5 a millisecond) from PACED_LAG_MS (250) after it, and a
    call that does not fit is told exactly when it will."""
    assert take(bucket, "a", 5000).status == "granted"
    answer(bucket, "a", 5000, 1000, 30.0)
    assert tokens_state(redis, clock)[:3] == (pytest.approx(1000), "steps", pytest.approx(30.0))
    waiting = take(bucket, "b", 2000)
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(30.45)
    clock[0] += 29_999
    assert tokens_state(redis, clock)[0] == pytest.approx(1000)  # no refill while held
    clock[0] += 1 + 250
    assert tokens_state(redis, clock)[0] == pytest.approx(1000)  # nor in the lag after the moment
    clock[0] += 100
    assert tokens_state(redis, clock)[0] == pytest.approx(1500)
    assert take(bucket, "b", 2000).status == "wait"
    clock[0] += 100
    assert take(bucket, "b", 2000).status == "granted"
    clock[0] += 1000  # all of the 5000 back (800 ms after it started), then continuous refill
    assert tokens_state(redis, clock)[0] == pytest.approx(6000 - 2000 + 20)


def test_a_window_that_returns_everything_at_once_is_followed_up_by_its_next_answer(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """A fixed window gives all of its room back at its end, faster than the pace: the first
    answer after the moment says so, and the level rises to it."""
    assert take(bucket, "a", 5000).status == "granted"
    answer(bucket, "a", 5000, 1000, 30.0)
    clock[0] += 30_450
    assert take(bucket, "b", 2000).status == "granted"
    answer(bucket, "b", 2000, 4000, 60.0)  # a new window: all of it back, less b
    assert tokens_state(redis, clock)[:3] == (pytest.approx(4000), "steps", pytest.approx(60.0))


@pytest.mark.parametrize(("shown", "lag_s"), [(4000, 0.0), (500, 0.25)])
def test_a_window_that_came_back_at_once_is_counted_back_from_its_next_moment_itself(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float], shown: int, lag_s: float
) -> None:
    """Room that comes back at a pace is counted back from PACED_LAG_MS (250 ms) after its moment:
    the call that told the moment may have reached the provider before the rest of its burst. A
    call taken just after the moment whose answer shows most of the window back (a fixed window:
    4000 of 6000, less itself) teaches that it comes back at once: the next moment's room is
    counted back from the moment itself. An answer showing only a little back (a rolling window:
    500) keeps the lag."""
    assert take(bucket, "a", 5000).status == "granted"  # 5000 in its first second: 5 a millisecond
    answer(bucket, "a", 5000, 1000, 30.0)
    clock[0] += 30_450
    assert take(bucket, "b", 2000).status == "granted"
    answer(bucket, "b", 2000, shown, 60.0)
    assert take(bucket, "c", shown).status == "granted"
    answer(bucket, "c", shown, 0, 59.9)  # the window spent again; its room back at 90.35 s
    clock[0] += 59_900 + 100
    back = 5 * max(0.0, 100 - lag_s * 1000)
    assert tokens_state(redis, clock)[0] == pytest.approx(back)


def test_the_level_keeps_within_the_providers_room_less_what_it_may_not_have_counted(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """An answer's remaining counts the call it answers, not always the calls taken after it (in
    flight, or already settled: an answer settled late), nor the calls in flight when it was taken
    (they may have reached the provider after it, and been answered since). The level falls to the
    remaining less what is surely missing (calls taken after it, in flight), and rises to it less
    all that may be missing, never more."""
    for rid in ("a", "b", "c"):
        assert take(bucket, rid, 1000).status == "granted"
        clock[0] += 1
    answer(bucket, "b", 1000, 2500, 20.0)  # someone else took 500; c is surely missing
    assert tokens_state(redis, clock)[:2] == (pytest.approx(2500 - 1000), "steps")
    answer(bucket, "a", 1000, 4000, 20.0)  # settled late: b and c may be missing from it
    assert tokens_state(redis, clock)[0] == pytest.approx(4000 - 2000)
    # a and b were in flight when c was taken, so c's answer alone may count neither; but the
    # lowest remaining told of this moment is 2500 and nothing is in flight: all of it.
    answer(bucket, "c", 1000, 2500, 20.0)
    assert tokens_state(redis, clock)[0] == pytest.approx(2500)


def test_a_level_ahead_of_the_providers_continuous_refill_follows_it_down(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """A token bucket's answer: the provider's room now is at most its remaining plus its refill
    since it answered. A level above that is ahead of the provider, however little (the 2%
    tolerance is for following someone else's use down to the remaining itself). Counted from
    the take, as before, the first call's way to the provider (0.4 s: client set-up, connection)
    left the level 1,600 tokens ahead at 600k TPM, and a batch running at the bottom of the
    bucket met 429s (3 of 600)."""
    assert take(bucket, "a", 5000).status == "granted"  # the level: 1000
    clock[0] += 300  # 30 tokens of refill
    # The provider answered 100 ms ago: 950 left (it counted 50 more than we did, or began
    # refilling later), a token bucket's reset.
    answer(bucket, "a", 5000, 950, (6000 - 950) / 100, age_s=0.1)
    assert tokens_state(redis, clock)[:2] == (pytest.approx(950 + 10), "continuous")


def test_an_answer_settled_late_tells_no_new_window(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """An answer to a call taken before the pending moment was first told is stale: it tells its
    moment later by however long it took to settle. Before: one settled 4 s late (a slow thread)
    read as a new window, and the level rose to the room it had seen (4 429s of 600 on a rolling
    window at interactive priority)."""
    assert take(bucket, "a", 1000).status == "granted"
    clock[0] += 10
    assert take(bucket, "b", 1000).status == "granted"
    answer(bucket, "b", 1000, 1000, 30.0)  # the moment: 30 s from now
    clock[0] += 4000
    answer(bucket, "a", 1000, 2000, 29.99)  # seen before b, settled 4 s late: "34 s"
    level, shape, back_in_s, _ = tokens_state(redis, clock)
    assert (level, shape, back_in_s) == (pytest.approx(1000), "steps", pytest.approx(26.0))


def test_an_answer_that_waited_for_the_ledger_counts_its_reset_from_when_it_came(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The ledger is written before the bucket is settled; under a busy database that took 3.7 s
    once, and "reset in 8 s" read from the settlement told a window 3.7 s later than the provider's:
    a new window, its room given out in the old one, 5 calls met 429s (fixed 10 s windows)."""
    assert take(bucket, "a", 1000).status == "granted"
    answer(bucket, "a", 1000, 5000, 30.0)
    clock[0] += 1000
    assert take(bucket, "b", 1000).status == "granted"
    clock[0] += 4000
    answer(bucket, "b", 1000, 4000, 29.0, age_s=4.0)  # came 1 s after a's: the same moment
    level, shape, back_in_s, _ = tokens_state(redis, clock)
    assert (level, shape, back_in_s) == (pytest.approx(4000), "steps", pytest.approx(25.0))
    assert take(bucket, "c", 3000).status == "granted"
    answer(bucket, "c", 3000, 0, 50.0, limited=True, pause_s=20.0, age_s=15.0)
    assert take(bucket, "d", 1).wait_s == pytest.approx(5.0)  # the retry-after, from the 429


def test_a_token_buckets_answer_settled_late_is_still_a_token_buckets(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The shape is judged on the answer's own figures: remaining 5000 and full in 10 s is a
    token bucket's, however late it is settled. (Judged on the reset counted from the settlement,
    one settled 3.2 s late read as steps, and a token bucket was held for 50 s.)"""
    assert take(bucket, "a", 1000).status == "granted"
    clock[0] += 4000
    answer(bucket, "a", 1000, 5000, 10.0, age_s=4.0)
    assert tokens_state(redis, clock)[1] == "continuous"


def test_with_nothing_in_flight_the_level_is_the_lowest_remaining_of_the_window(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Until a window's moment its room only shrinks: the lowest remaining told of that moment,
    less what is in flight now, is room the provider surely has, whatever order the answers
    came in. A call that ended without telling (an error without headers) may have been counted
    after any answer: it stays out of that bound until the moment."""
    for rid in ("a", "b"):
        assert take(bucket, rid, 1000).status == "granted"
        clock[0] += 1
    # a's answer counts b too (b reached the provider first), but b is in flight and was taken
    # after a: the level falls to 4000 less b.
    answer(bucket, "a", 1000, 4000, 30.0)
    assert tokens_state(redis, clock)[0] == pytest.approx(3000)
    # b's answer alone cannot raise it (a was in flight when b was taken), but nothing is in
    # flight any more and the lowest remaining told is 4000: that is the room.
    answer(bucket, "b", 1000, 4000, 30.0)
    assert tokens_state(redis, clock)[0] == pytest.approx(4000)
    for rid in ("d", "e"):
        assert take(bucket, rid, 500).status == "granted"
        clock[0] += 1
    charges = [Charge("requests", 60, 1), Charge("tokens", 6000, 0)]
    bucket.settle("d", "d", charges, Settlement({"requests": None, "tokens": None}))  # no headers
    answer(bucket, "e", 500, 3500, 30.0)  # may not count d
    assert tokens_state(redis, clock)[0] == pytest.approx(3500 - 500)
    clock[0] += 30_000  # the moment: a new window, a new lowest
    assert take(bucket, "f", 1000).status == "granted"
    answer(bucket, "f", 1000, 5000, 40.0)
    assert tokens_state(redis, clock)[0] == pytest.approx(5000)


def test_floors_are_lent_out_just_before_the_room_comes_back(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Bulk leaves 10% for interactive requests; in a window that room would come back unused,
    so in the last 2 s before the moment bulk may take it."""
    assert take(bucket, "a", 5000).status == "granted"
    answer(bucket, "a", 5000, 1000, 20.0)
    waiting = take(bucket, "b", 500, "bulk")  # 500 + 600 of floor > 1000
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(18.0)
    clock[0] += 18_000
    assert take(bucket, "b", 500, "bulk").status == "granted"


def test_a_floor_that_blocks_while_calls_are_in_flight_is_looked_at_again_soon(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """A window's level can be low only for what calls in flight reserved, and their answers
    raise it: a request stopped by the floor then looks again within half a second instead of
    waiting for the lend (seen: a batch's last request told to wait 8 s in a window its answers
    showed 81% used). With nothing in flight the lend is the first chance, as before."""
    assert take(bucket, "a", 4000).status == "granted"
    answer(bucket, "a", 4000, 2000, 20.0)  # a window: 2000 left, room back in 20 s
    assert take(bucket, "in-flight", 1000).status == "granted"  # 1000 left while it runs
    waiting = take(bucket, "b", 500, "bulk")  # 500 + 600 of floor > 1000
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(0.5)
    answer(bucket, "in-flight", 300, 1700, 20.0)  # it used less: the provider shows 1700
    assert take(bucket, "b", 500, "bulk").status == "granted"  # 500 + 600 <= 1700
    waiting = take(bucket, "c", 700, "bulk")  # 700 + 600 > 1200, and "b" is in flight
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(0.5)
    answer(bucket, "b", 500, 1200, 20.0)
    waiting = take(bucket, "c", 700, "bulk")  # nothing in flight: only the lend helps now
    assert waiting.status == "wait" and waiting.wait_s == pytest.approx(18.0)


def test_a_429_with_a_long_retry_after_teaches_the_shape(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """After a burst, the answers can look like a token bucket's (nothing left, full in a minute).
    A 429 whose retry-after is far beyond what refill would need for the call says otherwise."""
    assert take(bucket, "a", 5900).status == "granted"
    answer(bucket, "a", 5900, 100, 59.0)  # within slack of a token bucket's 59 s
    assert tokens_state(redis, clock)[1] == "continuous"
    clock[0] += 2000
    assert take(bucket, "b", 300).status == "granted"  # refill says 300 is there; it is not
    answer(bucket, "b", 0, 100, 57.0, limited=True, pause_s=57.0)  # 200 short: refill needs 2 s
    level, shape, back_s, factor = tokens_state(redis, clock)
    assert (shape, level, back_s) == ("steps", pytest.approx(100), pytest.approx(57.0))
    assert factor == pytest.approx(0.7)
    clock[0] += 57_000
    # Back as fast as it was taken (5900 within the first second) from 250 ms after the moment
    # (PACED_LAG_MS): 200 more within 284 ms.
    resuming = take(bucket, "c", 300)
    assert resuming.status == "wait" and resuming.wait_s == pytest.approx(0.284)
    clock[0] += 284
    assert take(bucket, "c", 300).status == "granted"


# --- the rate factor --------------------------------------------------------------------------


def test_one_burst_of_429s_drops_the_rate_once_and_room_in_the_headers_restores_it(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Three calls in flight are refused together: the factor drops once (0.7, not 0.34). The
    first answer to a call admitted after the drop that shows the room the bucket thinks it has
    brings it back to 1, instead of 30 s of 1% a second."""
    for rid in ("a", "b", "c"):
        assert take(bucket, rid, 100).status == "granted"
    clock[0] += 5
    for rid in ("a", "b", "c"):
        answer(bucket, rid, 0, 0, 60.0, limited=True, pause_s=1.0)  # a token bucket, empty
    assert tokens_state(redis, clock)[3] == pytest.approx(0.7)
    clock[0] += 2000
    assert take(bucket, "d", 100).status == "granted"
    answer(bucket, "d", 100, 4000, 20.0)  # more room than this bucket thinks it has
    assert tokens_state(redis, clock)[3] == 1.0
    # A 429 for a call admitted after that drop is news: it drops again.
    assert take(bucket, "e", 30).status == "granted"
    clock[0] += 5
    answer(bucket, "e", 0, 0, 60.0, limited=True, pause_s=1.0)
    assert tokens_state(redis, clock)[3] == pytest.approx(0.7)


def test_headers_showing_less_room_than_the_bucket_do_not_restore_the_rate(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The linear recovery goes on meanwhile (0.7 + 10 s x 1%)."""
    assert take(bucket, "a", 100).status == "granted"
    clock[0] += 5
    answer(bucket, "a", 0, 0, 60.0, limited=True, pause_s=1.0)
    clock[0] += 10_000
    assert take(bucket, "b", 100).status == "granted"
    answer(bucket, "b", 100, 10, 59.9)  # the provider has far less than this bucket's ~700
    assert tokens_state(redis, clock)[3] == pytest.approx(0.8)
