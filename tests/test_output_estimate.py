"""Learned output reservations on a real Redis: each answer's real output is recorded per route on
a bounded list, and once there are enough of them an Anthropic deployment with ``learn_output``
reserves their p99 x margin of OTPM instead of max_tokens; OpenAI's TPM never does."""

from __future__ import annotations

from typing import Any

import pytest
import redis as redis_lib
from redis.crc import key_slot

from broker_config import keys
from broker_config.bucket_state import read_state
from broker_config.deployments import Deployment
from workers.admission import (
    Bucket,
    BucketPolicy,
    Ticket,
    Wait,
    admit,
    estimate_call,
    learned_charges,
    settle,
    settlement,
)
from workers.output_estimate import OutputEstimates, OutputPolicy, learned_per_completion
from workers.providers.base import CallFailed, ProviderReply, Usage

CLAUDE = Deployment(
    name="claude", provider="anthropic", model="m", rpm=1000, itpm=1_000_000, otpm=100_000, learn_output=True
)
GPT = Deployment(name="gpt", provider="openai", model="m", rpm=1000, tpm=1_000_000, learn_output=True)
POLICY = OutputPolicy(samples_min=50, samples_kept=200, quantile=0.99, margin=1.2, floor_tokens=32)
BODY = {"model": "bench", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4096}


@pytest.fixture
def clock() -> list[float]:
    return [1_000_000.0]


@pytest.fixture
def bucket(redis: redis_lib.Redis, clock: list[float]) -> Bucket:
    return Bucket(redis, BucketPolicy(first_call_s=0.0, outputs=POLICY), clock_ms=lambda: clock[0])


def reserve(bucket: Bucket, deployment: Deployment, rid: str, body: dict[str, Any] = BODY) -> Ticket | Wait:
    ticket = admit(
        bucket,
        deployment,
        estimate_call(deployment, body, 1024),
        request_id=rid,
        priority="interactive",
        tenant=None,
        max_inline_wait_s=0,
        sleep=lambda _s: None,
    )
    assert isinstance(ticket, Ticket | Wait), ticket
    return ticket


def answered(bucket: Bucket, ticket: Ticket, output_tokens: int, body: dict[str, Any] = BODY) -> None:
    reply = ProviderReply(body={}, usage=Usage(10, output_tokens), http_status=200)
    estimate = estimate_call(ticket.deployment, body, 1024)
    assert settle(bucket, ticket, settlement(ticket.deployment, estimate, reply)).found


def learn(redis: redis_lib.Redis, deployment: Deployment, samples: list[int], route: str = "bench") -> None:
    redis.rpush(keys.output_samples(deployment.name, route), *samples)


def output_charge(bucket: Bucket, deployment: Deployment, body: dict[str, Any] = BODY) -> dict[str, float]:
    return {
        c.name: c.cost for c in learned_charges(bucket, deployment, estimate_call(deployment, body, 1024))
    }


def test_each_answer_is_recorded_per_completion_on_a_bounded_list(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """An answer of 2 completions and 601 output tokens records 301 on its route's list, in the
    deployment's hash slot; the list keeps only the latest samples_kept, and expires."""
    two = {**BODY, "n": 2}
    for i in range(POLICY.samples_kept + 20):
        ticket = reserve(bucket, CLAUDE, f"r{i}", two)
        assert isinstance(ticket, Ticket)
        answered(bucket, ticket, 601 if i else 7, two)
        clock[0] += 1000
    key = keys.output_samples("claude", "bench")
    assert key_slot(key.encode()) == key_slot(keys.bucket("claude").encode())  # one script on a Cluster
    assert redis.llen(key) == POLICY.samples_kept
    assert set(redis.lrange(key, 0, -1)) == {b"301"}  # the first (7 -> 4) has been pushed out
    assert 0 < redis.pttl(key) <= POLICY.keep_s * 1000


def test_a_call_that_did_not_answer_records_nothing(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """A failed call produced no answer to learn from; its settlement pushes no sample."""
    ticket = reserve(bucket, CLAUDE, "a")
    assert isinstance(ticket, Ticket)
    failed = CallFailed("boom", kind="status", status=500)
    settle(bucket, ticket, settlement(CLAUDE, estimate_call(CLAUDE, BODY, 1024), failed))
    assert redis.llen(keys.output_samples("claude", "bench")) == 0


def test_below_the_sample_floor_the_whole_cap_is_reserved(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """With 49 answers of 300 tokens learned, OTPM still holds max_tokens for the next call."""
    learn(redis, CLAUDE, [300] * (POLICY.samples_min - 1))
    assert output_charge(bucket, CLAUDE)["output_tokens"] == 4096


def test_above_it_the_quantile_times_margin_is_reserved(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """With 100 answers of 1..100 tokens, OTPM holds p99 (99) x 1.2 = 119 per completion, x n;
    the input and request charges do not change."""
    learn(redis, CLAUDE, list(range(1, 101)))
    charges = output_charge(bucket, CLAUDE)
    assert charges["output_tokens"] == 119
    assert (
        charges["requests"] == 1 and charges["input_tokens"] == estimate_call(CLAUDE, BODY, 1).prompt_tokens
    )
    assert output_charge(bucket, CLAUDE, {**BODY, "n": 3})["output_tokens"] == 3 * 119
    # Another route has learned nothing: it reserves its cap.
    assert output_charge(bucket, CLAUDE, {**BODY, "model": "other"})["output_tokens"] == 4096


def test_the_learned_figure_stays_between_the_floor_and_the_cap() -> None:
    """Nearest rank: p99 of 50 samples is their largest. Never under the floor, never over max_tokens."""
    assert learned_per_completion([10] * 49 + [1000], POLICY) == 1200
    assert learned_per_completion([300] * 49, POLICY) is None
    estimates = OutputEstimates(_Samples({keys.output_samples("claude", "r"): [5] * 60}), POLICY)  # type: ignore[arg-type]
    assert estimates.reservation(CLAUDE, "r", cap_tokens=4096, completions=1) == POLICY.floor_tokens
    long = OutputEstimates(_Samples({keys.output_samples("claude", "r"): [9000] * 60}), POLICY)  # type: ignore[arg-type]
    assert long.reservation(CLAUDE, "r", cap_tokens=4096, completions=2) == 2 * 4096


def test_openai_deployments_keep_reserving_max_tokens(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """OpenAI counts max_tokens against TPM at the door: whatever was learned, the TPM charge is the
    prompt + max_tokens, and its answers are not recorded. An Anthropic deployment without
    learn_output keeps its cap too."""
    learn(redis, GPT, list(range(1, 101)))
    estimate = estimate_call(GPT, BODY, 1024)
    assert output_charge(bucket, GPT)["tokens"] == estimate.prompt_tokens + 4096
    ticket = reserve(bucket, GPT, "a")
    assert isinstance(ticket, Ticket) and ticket.sampling is None
    answered(bucket, ticket, 300)
    assert redis.llen(keys.output_samples("gpt", "bench")) == 100
    unlearned = CLAUDE.model_copy(update={"learn_output": False})
    learn(redis, unlearned, list(range(1, 101)))
    assert output_charge(bucket, unlearned)["output_tokens"] == 4096


def test_a_call_that_outputs_more_than_it_reserved_settles_as_debt(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """Two calls reserve 119 of a 5,000 OTPM each and produce 4,000 each: the settlements charge the
    difference, the limit is 3,000 in debt, and the next call waits until it is refilled."""
    small = CLAUDE.model_copy(update={"otpm": 5000})
    learn(redis, small, list(range(1, 101)))
    first, second = reserve(bucket, small, "a"), reserve(bucket, small, "b")
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    assert {c.name: c.cost for c in first.charges}["output_tokens"] == 119
    answered(bucket, first, 4000)
    answered(bucket, second, 4000)
    levels = {s.name: s.level for s in read_state(redis, small, clock_ms=lambda: clock[0]).limits}
    assert levels["output_tokens"] == 5000 - 8000
    waiting = reserve(bucket, small, "c")
    assert isinstance(waiting, Wait) and waiting.reason == "output_tokens"
    assert waiting.seconds == pytest.approx((3000 + 119) / 5000 * 60, abs=0.05)


def test_a_sample_that_cannot_be_written_costs_the_settlement_nothing(
    bucket: Bucket, redis: redis_lib.Redis, clock: list[float]
) -> None:
    """The samples' key holding something else (WRONGTYPE): the settlement still gives back what
    the call did not use."""
    redis.set(keys.output_samples("claude", "bench"), "not a list")
    ticket = reserve(bucket, CLAUDE, "a")
    assert isinstance(ticket, Ticket)
    answered(bucket, ticket, 300)
    levels = {s.name: s.level for s in read_state(redis, CLAUDE, clock_ms=lambda: clock[0]).limits}
    assert levels["output_tokens"] == 100_000 - 300
    assert redis.get(keys.output_samples("claude", "bench")) == b"not a list"


def test_redis_failing_while_recording_or_reading_raises_nothing(
    bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A settlement whose script cannot reach Redis loses its refund and its sample, and says so;
    a learned figure that cannot be read is the whole cap."""
    ticket = reserve(bucket, CLAUDE, "a")
    assert isinstance(ticket, Ticket)

    def gone(*_args: object, **_kwargs: object) -> object:
        raise redis_lib.ConnectionError("Redis went away")

    monkeypatch.setattr(bucket, "_settle", gone)
    reply = ProviderReply(body={}, usage=Usage(10, 300), http_status=200)
    assert settle(bucket, ticket, settlement(CLAUDE, estimate_call(CLAUDE, BODY, 1), reply)).found is False
    estimates = OutputEstimates(_Samples({}, fail=True), POLICY)  # type: ignore[arg-type]
    assert estimates.reservation(CLAUDE, "bench", cap_tokens=4096, completions=1) is None


def test_admission_reads_the_learned_figure_once_per_refresh(bucket: Bucket, redis: redis_lib.Redis) -> None:
    """Admissions add no round trip per call: a process reads its figure once per refresh_s."""
    learn(redis, CLAUDE, list(range(1, 101)))
    now = [0.0]
    bucket.outputs = OutputEstimates(redis, POLICY, clock=lambda: now[0])

    def reads() -> int:
        return int(redis.info("commandstats").get("cmdstat_lrange", {}).get("calls", 0))

    before = reads()
    for _ in range(50):
        assert output_charge(bucket, CLAUDE)["output_tokens"] == 119
    assert reads() - before == 1
    learn(redis, CLAUDE, [1000, 1000])  # longer answers arrive: the figure follows at the next refresh
    now[0] += POLICY.refresh_s
    assert output_charge(bucket, CLAUDE)["output_tokens"] == 1200
    assert reads() - before == 2


class _Samples:
    """A stand-in for the Redis client's LRANGE (the pure parts need no server)."""

    def __init__(self, lists: dict[str, list[int]], *, fail: bool = False) -> None:
        self.lists, self.fail = lists, fail

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        if self.fail:
            raise redis_lib.ConnectionError("Redis went away")
        return [str(x).encode() for x in self.lists.get(key, [])[start : end + 1]]
