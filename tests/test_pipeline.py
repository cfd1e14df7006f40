"""The call pipeline in-process, on both databases, against real HTTP endpoints: retries,
fallbacks, failures, deadlines, redeliveries, and an OpenAI-compatible server that is not ours."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis as redis_lib
import uvicorn
from fastapi import FastAPI
from sqlalchemy import select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch, result_line
from db.batch_state import load_counted
from db.engine import Database
from db.models import Attempt, Batch, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from headrace.embedded import free_port
from tests.pipeline_deps import pipeline_deps
from tests.simulator_fixture import SimControl
from workers.admission import Bucket
from workers.breaker import Breaker, BreakerPolicy
from workers.pipeline import Deps, run_request

KEY_ENV = "HEADRACE_TEST_SIM_KEY"


def _config(sim: str, compat: str = "http://127.0.0.1:9") -> str:
    dead = f"http://127.0.0.1:{free_port()}"
    return f"""
[[deployments]]
name = "down"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{dead}/v1"
api_key_env = "{KEY_ENV}"

[[deployments]]
name = "oa"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{KEY_ENV}"

[[deployments]]
name = "an"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{sim}"
api_key_env = "{KEY_ENV}"

[[deployments]]
name = "compat"
provider = "openai"
model = "local-model"
base_url = "{compat}"
api_key_env = "{KEY_ENV}"
input_price_per_mtok = 1
output_price_per_mtok = 2

[[deployments]]
name = "tiny"
provider = "openai"
model = "gpt-4o"
base_url = "{sim}/v1"
api_key_env = "{KEY_ENV}"
rpm = 1
tpm = 300

[[routes]]
name = "tiny-then-oa"
deployments = ["tiny", "oa"]

[[routes]]
name = "tiny-only"
deployments = ["tiny"]

[[routes]]
name = "chain"
deployments = ["down", "oa"]

[[routes]]
name = "cross"
deployments = ["oa", "an"]

[[routes]]
name = "to-anthropic"
deployments = ["down", "an"]

[[routes]]
name = "hurried"
deployments = ["oa"]
deadline_s = 1.5

[[routes]]
name = "single"
deployments = ["oa"]
max_attempts_per_deployment = 2

[[routes]]
name = "capped"
deployments = ["oa"]
max_input_tokens = 60

[[routes]]
name = "capped-trim"
deployments = ["oa"]
max_input_tokens = 60
on_overflow = "trim"
"""


@pytest.fixture
def deps(
    db: Database, sim: SimControl, monkeypatch: pytest.MonkeyPatch, compat_url: str, redis: redis_lib.Redis
) -> Deps:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    config = _config(sim.url, compat_url)
    return pipeline_deps(db, config, redis, max_attempts_per_deployment=3, call_timeout_s=2)


def _submit(deps: Deps, route: str, text: str = "hello", n: int = 1, max_tokens: int = 20) -> list[str]:
    tenant = create_api_key(deps.db, "t").tenant_id
    body = {"model": route, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    lines = [BatchLine(i + 1, f"c{i}", route, body) for i in range(n)]
    batch = create_batch(deps.db, BatchSpec(tenant, Priority.DEFAULT, None, 3600), lines)
    with deps.db.session() as session:
        query = select(LlmRequest.id).where(LlmRequest.batch_id == batch.id).order_by(LlmRequest.line_no)
        return list(session.scalars(query))


def _state(deps: Deps, request_id: str) -> tuple[LlmRequest, list[Attempt], Batch]:
    with deps.db.session() as session:
        request = session.get(LlmRequest, request_id)
        attempts = list(
            session.scalars(
                select(Attempt).where(Attempt.request_id == request_id).order_by(Attempt.attempt_no)
            )
        )
        batch = load_counted(session, request.batch_id)  # type: ignore[union-attr]
    return request, attempts, batch  # type: ignore[return-value]


def test_a_dead_deployment_is_retried_then_the_chain_falls_back(deps: Deps) -> None:
    """3 refused connections on the primary (each an attempt row, costing nothing), then the
    secondary answers; the request says which deployment answered."""
    (rid,) = _submit(deps, "chain")
    run_request(rid, deps)
    request, attempts, batch = _state(deps, rid)
    assert request.status == "succeeded" and request.deployment == "oa" and request.attempt_count == 4
    assert [(a.deployment, a.outcome) for a in attempts] == [("down", "retry")] * 3 + [("oa", "success")]
    assert all(a.cost_usd == 0 for a in attempts[:3]) and attempts[3].cost_usd > 0
    assert batch.status == "completed" and batch.cost_usd == request.cost_usd == attempts[3].cost_usd


def test_a_chain_can_cross_providers(deps: Deps) -> None:
    """OpenAI unreachable, Anthropic answers the same canonical request, translated both ways."""
    (rid,) = _submit(deps, "to-anthropic")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "succeeded" and request.deployment == "an"
    assert [a.deployment for a in attempts] == ["down"] * 3 + ["an"]
    assert request.response["object"] == "chat.completion"  # type: ignore[index]


def test_trouble_everywhere_waits_while_the_window_is_open_then_expires_with_each_error(
    deps: Deps, redis: redis_lib.Redis
) -> None:
    """Overloaded everywhere (503, refused before any work): every attempt recorded, none counted
    against the request's budget; the request waits in the delay queue with each deployment's
    last error instead of failing; once its batch's window has passed it ends ``expired`` with
    those errors, not ``failed`` for a fault that was not its own."""
    (rid,) = _submit(deps, "cross", "[[sim:status=503]] hi")
    run_request(rid, deps)
    request, attempts, batch = _state(deps, rid)
    assert [a.deployment for a in attempts] == ["oa"] * 3 + ["an"] * 3
    assert not any(a.error["may_have_billed"] for a in attempts)  # type: ignore[index]
    assert (request.status, request.park_rounds, batch.failed_count) == ("queued", 1, 0)
    assert request.error["kind"] == "waiting"  # type: ignore[index]
    assert [d["deployment"] for d in request.error["deployments"]] == ["oa", "an"]  # type: ignore[index]
    assert redis.zscore("headrace:delayed", f"default|{rid}") is not None
    with deps.db.write() as session:
        window = load_counted(session, batch.id)
        window.expires_at = window.created_at  # type: ignore[union-attr]
    run_request(rid, deps)
    request, attempts, batch = _state(deps, rid)
    assert request.status == "expired" and batch.expired_count == 1 and len(attempts) == 6
    assert [d["status"] for d in request.error["deployments"]] == [503, 503]  # type: ignore[index]


def test_requests_parked_for_a_deployments_trouble_are_released_when_its_breaker_closes(
    deps: Deps, redis: redis_lib.Redis
) -> None:
    """Parked for trouble, a request waits its backoff, unless the breaker of the deployment
    that was in trouble closes first: then it is due at once (the bucket paces it like any
    other). Before: requests parked late in an outage waited up to their whole backoff after the
    provider was back (+27 s of span in bench/rate_limits.py --faults on 10 s windows)."""
    policy = BreakerPolicy(open_s=0.05, probes=1, consecutive_failures=3)
    deps = replace(deps, bucket=Bucket(redis, breaker=policy))
    (parked,) = _submit(deps, "single", "[[sim:status=503]] hi")
    run_request(parked, deps)  # two 503s: the breaker not yet open, the request parked
    member = f"default|{parked}"
    assert redis.zscore("headrace:{oa}:waiters", member) is not None
    redis.zadd("headrace:delayed", {member: 10**15})  # as if its backoff were long
    for i in range(3):
        Breaker(redis, policy).record("oa", f"x{i}", failed=True, probe=False)
    time.sleep(0.1)  # open, then half-open: the next call is the probe
    (probe,) = _submit(deps, "single")
    run_request(probe, deps)
    assert _state(deps, probe)[0].status == "succeeded"
    now_s, now_us = redis.time()
    assert redis.zscore("headrace:delayed", member) <= now_s * 1000 + now_us / 1000
    assert not redis.exists("headrace:{oa}:waiters")


def test_a_deployment_that_cannot_serve_fails_the_request_when_nothing_else_can(deps: Deps) -> None:
    """Its key refused everywhere (401: waiting will not change that): failed at once, with the
    last error of each deployment."""
    (rid,) = _submit(deps, "cross", "[[sim:status=401]] hi")
    run_request(rid, deps)
    request, attempts, batch = _state(deps, rid)
    assert request.status == "failed" and batch.failed_count == 1
    assert [a.deployment for a in attempts] == ["oa", "an"]
    assert [d["status"] for d in request.error["deployments"]] == [401, 401]  # type: ignore[index]


def test_a_request_fault_fails_at_once_without_trying_the_rest_of_the_chain(deps: Deps) -> None:
    (rid,) = _submit(deps, "cross", "[[sim:status=400]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "failed" and [(a.deployment, a.outcome) for a in attempts] == [("oa", "fail")]
    assert request.error["status"] == 400  # type: ignore[index]


def test_attempts_per_deployment_come_from_the_route(deps: Deps) -> None:
    """Route "single" allows two tries on its deployment per round; then the request waits."""
    (rid,) = _submit(deps, "single", "[[sim:status=500]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "queued" and len(attempts) == 2


def test_a_redelivered_finished_request_makes_no_call(deps: Deps, sim: SimControl) -> None:
    (rid,) = _submit(deps, "single")
    run_request(rid, deps)
    run_request(rid, deps)
    _, attempts, batch = _state(deps, rid)
    assert len(attempts) == 1 and sum(sim.stats()["received"].values()) == 1 and batch.succeeded_count == 1


def test_a_request_past_its_batch_window_expires_without_a_call(deps: Deps, sim: SimControl) -> None:
    (rid,) = _submit(deps, "single")
    with deps.db.write() as session:
        batch = load_counted(session, session.get(LlmRequest, rid).batch_id)  # type: ignore[union-attr]
        batch.expires_at = batch.created_at - timedelta(seconds=1)  # type: ignore[union-attr]
    run_request(rid, deps)
    request, attempts, batch = _state(deps, rid)
    assert request.status == "expired" and attempts == [] and batch.status == "expired"
    assert sum(sim.stats()["received"].values()) == 0


def test_long_retry_after_falls_back_instead_of_holding_the_slot(deps: Deps) -> None:
    """A provider asking for a minute's wait: the next deployment is tried now instead."""
    deps = replace(deps, settings=deps.settings.model_copy(update={"max_inline_wait_s": 5}))
    (rid,) = _submit(deps, "cross", "[[sim:status=429]] [[sim:retry_after=60]] hi")
    slept: list[float] = []
    run_request(rid, replace(deps, sleep=slept.append))
    _, attempts, _ = _state(deps, rid)
    assert [a.deployment for a in attempts] == ["oa", "an"] and slept == []


@pytest.fixture(scope="module")
def compat_url() -> Iterator[str]:
    """A minimal OpenAI-compatible server under its own path prefix, in the style of local model
    servers: no rate-limit headers, bare usage, extra fields."""
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    @app.post("/serving/openai/v1/chat/completions")
    def complete(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return {
            "id": "cmpl-local-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "local answer"},
                    "finish_reason": "stop",
                    "stop_reason": None,
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13},
            "kv_cache_usage": 0.1,
        }

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/serving/openai/v1"
    server.should_exit = True
    thread.join(5)


def test_any_openai_compatible_base_url_works(deps: Deps) -> None:
    """A producer naming a deployment's model reaches that deployment; price from the override."""
    (rid,) = _submit(deps, "local-model")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "succeeded" and request.deployment == "compat"
    assert request.response["choices"][0]["message"]["content"] == "local answer"  # type: ignore[index]
    assert request.response["kv_cache_usage"] == 0.1  # the provider's own JSON is kept  # type: ignore[index]
    assert attempts[0].cost_usd == Decimal("0.000015")  # 11 * 1/1M + 2 * 2/1M


def test_a_request_too_large_for_a_deployment_fails_fast_without_a_call(deps: Deps, sim: SimControl) -> None:
    """500 max_tokens can never fit a 300 TPM limit: no call, no wait, a clear error."""
    (rid,) = _submit(deps, "tiny-only", max_tokens=500)
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "failed" and attempts == []
    assert request.error["deployments"][0]["kind"] == "too_large"  # type: ignore[index]
    assert "can never fit" in request.error["deployments"][0]["message"]  # type: ignore[index]
    assert "300 per minute" in request.error["deployments"][0]["message"]  # type: ignore[index]
    assert sum(sim.stats()["received"].values()) == 0


def test_a_full_deployment_passes_the_request_down_the_chain(deps: Deps) -> None:
    """The first deployment's bucket is empty for a minute: the next one answers, now."""
    first, second = _submit(deps, "tiny-then-oa", n=2)
    run_request(first, deps)
    run_request(second, deps)
    assert _state(deps, first)[0].deployment == "tiny"
    request, attempts, _ = _state(deps, second)
    assert request.deployment == "oa" and [a.deployment for a in attempts] == ["oa"]


def test_a_request_no_deployment_has_room_for_is_parked_not_failed(
    deps: Deps, redis: redis_lib.Redis
) -> None:
    """RPM 1 and a second request: it goes back to the queue through the delay queue, due when
    the bucket has refilled; no attempt is made and no worker slot waits a minute."""
    first, second = _submit(deps, "tiny-only", n=2)
    run_request(first, deps)
    slept: list[float] = []
    run_request(second, replace(deps, sleep=slept.append))
    request, attempts, _ = _state(deps, second)
    assert request.status == "queued" and attempts == [] and sum(slept) <= 4
    ((member, ready_ms),) = redis.zrange("headrace:delayed", 0, -1, withscores=True)
    assert member.decode() == f"default|{second}"
    now_s, now_us = redis.time()
    # A minute for one request's refill, and the quarter second a new bucket starts late.
    assert 50_000 < ready_ms - (now_s * 1000 + now_us / 1000) <= 60_250
    published: list[tuple[str, str]] = []
    redis.zadd("headrace:delayed", {member: 0})  # pretend the minute has passed
    assert deps.delays.publish_due(published.extend) == 1
    assert published == [(second, "default")] and redis.zcard("headrace:delayed") == 0


def test_a_429_parks_the_request_instead_of_spending_its_attempts(deps: Deps, redis: redis_lib.Redis) -> None:
    """Rate-limited at the provider: one attempt recorded, the request waits for the retry-after
    in the delay queue (everyone else waits too: the deployment is paused)."""
    (rid,) = _submit(deps, "single", "[[sim:status=429]] [[sim:retry_after=30]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "queued" and [a.outcome for a in attempts] == ["retry"]
    assert redis.zcard("headrace:delayed") == 1
    assert 25 < float(redis.hget("headrace:{oa}:bucket", "pause") or 0) / 1000 - redis.time()[0] <= 31


def test_a_provider_that_only_says_429_never_ends_the_request_while_its_window_is_open(
    deps: Deps, redis: redis_lib.Redis
) -> None:
    """A 429 was refused before any work: it costs nothing and spends none of the budget, even a
    budget of one call; the request waits for the provider's retry-after instead."""
    deps = replace(deps, settings=deps.settings.model_copy(update={"max_attempts_per_request": 1}))
    (rid,) = _submit(deps, "single", "[[sim:status=429]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "queued" and len(attempts) == 1 and not attempts[0].error["may_have_billed"]  # type: ignore[index]
    assert redis.zscore("headrace:delayed", f"default|{rid}") is not None


def test_a_request_stops_when_the_calls_it_may_have_paid_for_are_spent(deps: Deps) -> None:
    """The per-request budget counts what the provider may have charged for: a 500 after the call
    reached it counts, and a budget of two ends the request ``failed`` after two such calls."""
    deps = replace(deps, settings=deps.settings.model_copy(update={"max_attempts_per_request": 2}))
    (rid,) = _submit(deps, "single", "[[sim:status=500]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "failed" and len(attempts) == 2
    assert all(a.error["may_have_billed"] for a in attempts)  # type: ignore[index]
    assert "2 calls the provider may have charged for" in request.error["message"]  # type: ignore[index]


def test_a_request_past_its_deadline_expires_and_its_hung_call_is_cut_at_the_deadline(deps: Deps) -> None:
    """A route's 1.5 s deadline: the hung call is cut when the deadline comes (not at the 2 s call
    timeout), and no further call is made."""
    (rid,) = _submit(deps, "hurried", "[[sim:hang]] hi")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "expired" and "deadline" in request.error["message"]  # type: ignore[index]
    assert len(attempts) == 1 and attempts[0].error["kind"] == "timeout"  # type: ignore[index]
    assert attempts[0].latency_ms is not None and attempts[0].latency_ms < 1900


def test_a_fallback_is_counted_per_route_and_deployment(deps: Deps, redis: redis_lib.Redis) -> None:
    (rid,) = _submit(deps, "to-anthropic")
    run_request(rid, deps)
    assert redis.hgetall("headrace:fallbacks") == {b"to-anthropic|an": b"1"}


def _conversation(deps: Deps, route: str) -> str:
    """A request whose history is long: a system message, six old turns of ~40 tokens, a question."""
    old = "an earlier turn of this conversation " * 4
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(3):
        messages += [{"role": "user", "content": f"{i} {old}"}, {"role": "assistant", "content": old}]
    messages.append({"role": "user", "content": "and now?"})
    tenant = create_api_key(deps.db, "t").tenant_id
    body = {"model": route, "messages": messages, "max_tokens": 10}
    batch = create_batch(
        deps.db, BatchSpec(tenant, Priority.DEFAULT, None, 3600), [BatchLine(1, "c", route, body)]
    )
    with deps.db.session() as session:
        return str(session.scalar(select(LlmRequest.id).where(LlmRequest.batch_id == batch.id)))


def test_a_prompt_over_the_routes_input_budget_is_refused_before_any_call(deps: Deps) -> None:
    rid = _conversation(deps, "capped")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "failed" and attempts == []
    assert request.error is not None and request.error["kind"] == "input_too_long"
    assert "route 'capped' allows 60 (max_input_tokens)" in request.error["message"]


def test_a_trimming_route_drops_the_oldest_turns_and_says_so_on_the_result_line(deps: Deps) -> None:
    rid = _conversation(deps, "capped-trim")
    run_request(rid, deps)
    request, attempts, _ = _state(deps, rid)
    assert request.status == "succeeded" and len(attempts) == 1
    assert request.notes == {"trimmed_messages": 6}
    assert attempts[0].estimated_input_tokens <= 60, "the call carried the trimmed conversation"
    assert len(request.body["messages"]) == 8, "the ledger keeps the request as it was sent to us"
    assert result_line(request)["trimmed_messages"] == 6
