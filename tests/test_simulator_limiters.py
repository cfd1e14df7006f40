"""The simulator's limiter shapes (token bucket, rolling window, fixed window, each with an optional
sub-window): exact arithmetic on a fake clock, then through the official SDKs with short windows."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import anthropic
import openai
import pytest

from headrace.simulator.buckets import Denial, Grant, Limiter, Rules
from headrace.simulator.config import SimConfig
from tests.test_simulator import ant, chat, message, oai

if TYPE_CHECKING:
    from tests.simulator_fixture import SimControl

SCOPE = ("openai", "sk", "m")
LIMITS: dict[str, int | None] = {"tokens": 600}  # 10 tokens a second


def admit(limiter: Limiter, amount: int, now: float, rules: Rules) -> Denial | Grant:
    return limiter.admit(SCOPE, {"tokens": amount}, LIMITS, now, rules)


def state(limiter: Limiter, now: float, rules: Rules) -> tuple[int, float]:
    (only,) = limiter.states(SCOPE, LIMITS, now, rules)
    assert only.limit == 600  # always the per-minute value
    return only.remaining, only.reset_s


def test_a_token_bucket_refills_continuously() -> None:
    rules, limiter = Rules("token-bucket"), Limiter()
    assert isinstance(admit(limiter, 600, 0.0, rules), Grant)
    denied = admit(limiter, 100, 1.0, rules)
    assert isinstance(denied, Denial) and denied.wait_s == pytest.approx(9.0)
    assert state(limiter, 1.0, rules) == (10, pytest.approx(59.0))
    assert isinstance(admit(limiter, 100, 10.0, rules), Grant)


def test_a_rolling_window_returns_each_admission_exactly_a_window_later() -> None:
    """Nothing comes back before an admission is a window old; then exactly what it took. The
    reset is when room starts coming back (the oldest admission's expiry)."""
    rules, limiter = Rules("rolling"), Limiter()
    assert isinstance(admit(limiter, 400, 0.0, rules), Grant)
    assert isinstance(admit(limiter, 200, 5.0, rules), Grant)
    assert state(limiter, 30.0, rules) == (0, pytest.approx(30.0))
    denied = admit(limiter, 300, 30.0, rules)
    assert isinstance(denied, Denial) and denied.wait_s == pytest.approx(30.0)  # the 400 returns at 60
    assert isinstance(admit(limiter, 300, 59.999, rules), Denial)
    assert isinstance(admit(limiter, 300, 60.0, rules), Grant)
    assert state(limiter, 60.0, rules) == (100, pytest.approx(5.0))  # the 200 is next
    denied = admit(limiter, 250, 61.0, rules)
    assert isinstance(denied, Denial) and denied.wait_s == pytest.approx(4.0)  # the 200 at 65


def test_a_fixed_window_opens_on_first_use_and_returns_everything_when_it_closes() -> None:
    rules, limiter = Rules("fixed"), Limiter()
    assert state(limiter, 100.0, rules) == (600, 0.0)  # nothing open yet
    assert isinstance(admit(limiter, 500, 100.0, rules), Grant)
    assert isinstance(admit(limiter, 100, 150.0, rules), Grant)
    denied = admit(limiter, 1, 150.0, rules)
    assert isinstance(denied, Denial) and denied.wait_s == pytest.approx(10.0)
    assert state(limiter, 150.0, rules) == (0, pytest.approx(10.0))
    assert isinstance(admit(limiter, 600, 160.0, rules), Grant)  # a new window, opened at 160
    assert state(limiter, 200.0, rules) == (0, pytest.approx(20.0))


@pytest.mark.parametrize("shape", ["token-bucket", "rolling", "fixed"])
def test_a_sub_window_is_enforced_together_with_the_minute(shape: str) -> None:
    """A 10 s sub-window holds a sixth of the minute; what is told is the room the next call can
    take, under the per-minute limit."""
    rules, limiter = Rules(shape, 60.0, 10.0), Limiter()  # type: ignore[arg-type]
    assert isinstance(admit(limiter, 101, 0.0, rules), Denial)  # larger than the sub-window
    assert isinstance(admit(limiter, 100, 0.0, rules), Grant)
    denied = admit(limiter, 50, 1.0, rules)
    assert isinstance(denied, Denial) and denied.limit == 600
    remaining, reset_s = state(limiter, 1.0, rules)
    assert remaining == (10 if shape == "token-bucket" else 0)
    assert reset_s == pytest.approx(9.0)  # the sub-window binds: its room is back at 10 s
    # Six sub-windows' worth fill the minute; then the minute binds.
    clock = 0.0
    for _ in range(5):
        clock += 10.0
        assert isinstance(admit(limiter, 100, clock, rules), Grant), clock
    if shape != "token-bucket":
        assert isinstance(admit(limiter, 100, 59.0, rules), Denial)
        assert state(limiter, 59.0, rules)[0] == 0


@pytest.mark.parametrize("shape", ["rolling", "fixed"])
def test_a_refund_goes_back_to_the_window_it_was_taken_from(shape: str) -> None:
    rules, limiter = Rules(shape), Limiter()  # type: ignore[arg-type]
    grant = admit(limiter, 600, 0.0, rules)
    assert isinstance(grant, Grant)
    limiter.refund(grant, "tokens", 200, 1.0)
    assert state(limiter, 1.0, rules)[0] == 200
    late = admit(limiter, 200, 1.0, rules)
    assert isinstance(late, Grant)
    limiter.refund(late, "tokens", 500, 70.0)  # its window has closed (or it expired): nothing
    assert state(limiter, 70.0, rules)[0] == 600


def test_the_shape_can_change_at_runtime_and_rebuilds_the_limit() -> None:
    limiter = Limiter()
    assert isinstance(admit(limiter, 600, 0.0, Rules("token-bucket")), Grant)
    assert isinstance(admit(limiter, 600, 1.0, Rules("rolling")), Grant)


def test_config_refuses_a_sub_window_not_shorter_than_the_window() -> None:
    with pytest.raises(ValueError, match="sub_window_s"):
        SimConfig(limiter="fixed", window_s=10, sub_window_s=10)


# --- through the SDKs -----------------------------------------------------------------------


def test_openai_on_a_rolling_window_says_when_room_comes_back(sim: SimControl) -> None:
    """x-ratelimit-reset-requests is a Go duration to the oldest admission's expiry, and so is a
    429's retry-after here (one request returns then); the call fits then."""
    sim.configure(limiter="rolling", window_s=2.0, rpm=60)  # two requests per 2 s window
    client = oai(sim)
    chat(client, max_tokens=5)
    time.sleep(0.8)
    chat(client, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, max_tokens=5)
    headers = caught.value.response.headers
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "0"
    retry_s = int(headers["retry-after-ms"]) / 1000
    assert 0.9 <= retry_s <= 1.2  # the first call's expiry
    assert go_seconds(headers["x-ratelimit-reset-requests"]) == pytest.approx(retry_s, abs=0.01)
    time.sleep(retry_s)
    assert chat(client, max_tokens=5).usage.completion_tokens > 0


def go_seconds(text: str) -> float:
    value = float(text.removesuffix("ms")) / 1000 if text.endswith("ms") else float(text.removesuffix("s"))
    return value


def test_openai_headers_on_a_fixed_window_count_down_to_its_end(sim: SimControl) -> None:
    sim.configure(limiter="fixed", window_s=3.0, rpm=40)  # two requests per 3 s window
    client = oai(sim)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert raw.headers["x-ratelimit-limit-requests"] == "40"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    chat(client, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, max_tokens=5)
    headers = caught.value.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 3000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    time.sleep(int(headers["retry-after-ms"]) / 1000)
    assert chat(client, max_tokens=5).usage.completion_tokens > 0


def test_anthropic_reset_on_a_rolling_window_is_a_time_on_the_servers_clock(sim: SimControl) -> None:
    """The reset is an RFC 3339 time; against the reply's own Date header it gives the duration
    without trusting the caller's clock."""
    sim.configure(limiter="rolling", window_s=4.0, anthropic_rpm=30)  # two requests per 4 s window
    client = ant(sim)
    message(client, max_tokens=5)
    raw = client.messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.fromisoformat(raw.headers["anthropic-ratelimit-requests-reset"].replace("Z", "+00:00"))
    sent = parsedate_to_datetime(raw.headers["date"])
    assert reset.tzinfo == UTC and 2 <= (reset - sent).total_seconds() <= 6
    with pytest.raises(anthropic.RateLimitError) as caught:
        message(client, max_tokens=5)
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 4
