"""The answer cache and single flight, in-process on both databases, against the simulator over
HTTP and a real Redis: what may be cached, hits at no cost, tenants kept apart, refresh and off,
an evicted entry only a miss, and identical requests in flight making one call."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import redis as redis_lib
from sqlalchemy import select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch, result_line
from broker_config import keys, metrics
from broker_config.deployments import Route
from db.budgets import period_bounds, set_budget
from db.engine import Database
from db.models import Attempt, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from db.types import utcnow
from db.usage import UsageQuery, as_json, usage_report
from tests.pipeline_deps import pipeline_deps
from tests.simulator_fixture import SimControl
from workers.answer_cache import AnswerCache, plan_for, request_hash, why_not_cacheable
from workers.budgets import Budgets
from workers.cached_runs import CacheDeps
from workers.pipeline import Deps, run_request
from workers.semantic_cache import SemanticCache
from workers.single_flight import Flights

KEY_ENV = "HEADRACE_TEST_SIM_KEY"
QUESTION = "What is the boiling point of water at sea level?"


def _config(sim: str) -> str:
    return f"""
[[deployments]]
name = "oa"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{KEY_ENV}"

[[routes]]
name = "cached"
deployments = ["oa"]
cache = "exact"

[[routes]]
name = "plain"
deployments = ["oa"]

[[routes]]
name = "meaning"
deployments = ["oa"]
cache = "semantic"
"""


@pytest.fixture
def deps(db: Database, sim: SimControl, monkeypatch: pytest.MonkeyPatch, redis: redis_lib.Redis) -> Deps:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    deps = pipeline_deps(db, _config(sim.url), redis, sleep=time.sleep, call_timeout_s=5, coalesce_wait_s=10)
    return replace(deps, cache=CacheDeps(AnswerCache(redis), Flights(redis, 60)))


def _with_semantic(deps: Deps) -> Deps:
    assert deps.cache is not None
    semantic = SemanticCache(deps.cache.answers, deps.settings, deps.config)
    return replace(deps, cache=replace(deps.cache, semantic=semantic))


def _submit(
    deps: Deps, route: str, text: str = QUESTION, *, tenant: str = "t", n: int = 1, **extra: Any
) -> list[str]:
    tenant_id = create_api_key(deps.db, tenant).tenant_id
    body = {
        "model": route,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 20,
        "temperature": 0,
    }
    body |= extra.pop("body", {})
    lines = [BatchLine(i + 1, f"c{i}", route, body, tags=extra.get("tags")) for i in range(n)]
    batch = create_batch(deps.db, BatchSpec(tenant_id, Priority.DEFAULT, None, 3600), lines)
    with deps.db.session() as session:
        query = select(LlmRequest.id).where(LlmRequest.batch_id == batch.id).order_by(LlmRequest.line_no)
        return list(session.scalars(query))


def _ended(deps: Deps, request_id: str) -> tuple[LlmRequest, list[Attempt]]:
    with deps.db.session() as session:
        request = session.get(LlmRequest, request_id)
        assert request is not None
        attempts = list(session.scalars(select(Attempt).where(Attempt.request_id == request_id)))
        session.expunge_all()
    return request, attempts


def _calls(sim: SimControl) -> int:
    return sum(sim.stats()["received"].values())


def test_the_key_is_the_request_not_who_asked_nor_the_order_of_its_fields() -> None:
    body = {"model": "cached", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    same = {"temperature": 0, "user": "u-42", "metadata": {"a": 1}, "stream": True, **body}
    assert request_hash(body) == request_hash(same)
    assert request_hash(body) != request_hash({**body, "max_tokens": 5})
    route = Route(name="cached", deployments=("oa",), cache="exact")
    one, other = plan_for(route, "a", {}, body), plan_for(route, "b", {}, body)
    assert one is not None and other is not None and one.key != other.key  # per tenant
    shared = route.model_copy(update={"cache_scope": "global"})
    assert plan_for(shared, "a", {}, body).key == plan_for(shared, "b", {}, body).key  # type: ignore[union-attr]


def test_only_answers_a_fresh_call_would_repeat_are_cached() -> None:
    route = Route(name="cached", deployments=("oa",), cache="exact")
    message = {"messages": [{"role": "user", "content": "hi"}]}
    assert why_not_cacheable(route, {**message, "temperature": 0}) is None
    assert why_not_cacheable(route, message) == "temperature is not 0"  # the default is 1
    assert why_not_cacheable(route, {**message, "temperature": 0.7}) == "temperature is not 0"
    assert why_not_cacheable(route, {**message, "temperature": 0, "n": 2}) == "n > 1"
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert why_not_cacheable(route, {**message, "temperature": 0, "tools": tools}) == "tools"
    lenient = route.model_copy(update={"cache_nondeterministic": True, "cache_n": True, "cache_tools": True})
    assert why_not_cacheable(lenient, {**message, "temperature": 1, "n": 2, "tools": tools}) is None
    plain = Route(name="plain", deployments=("oa",))
    assert plan_for(plain, "t", {}, {**message, "temperature": 0}) is None
    assert plan_for(plain, "t", {"headrace_cache": "on"}, {**message, "temperature": 0}) is not None
    assert plan_for(route, "t", {"headrace_cache": "off"}, {**message, "temperature": 0}) is None


def test_a_repeat_is_served_at_no_cost_and_never_to_another_tenant(deps: Deps, sim: SimControl) -> None:
    def lookups(result: str) -> float:
        return float(metrics.cache_lookups.labels("cached", result)._value.get())

    hits_before = lookups("hit")
    (first,) = _submit(deps, "cached")
    run_request(first, deps)
    paid, _ = _ended(deps, first)
    assert paid.status == "succeeded" and paid.cost_usd > 0 and _calls(sim) == 1

    (again,) = _submit(deps, "cached")
    run_request(again, deps)
    served, attempts = _ended(deps, again)
    assert _calls(sim) == 1
    assert served.status == "succeeded" and served.response == paid.response
    assert (served.cost_usd, served.saved_cost_usd, served.served_from) == (0, paid.cost_usd, "cache")
    assert [(a.outcome, a.cost_usd, a.saved_cost_usd) for a in attempts] == [("cache_hit", 0, paid.cost_usd)]
    line = result_line(served)
    assert line["cached"] is True and line["cost_usd"] == "0"
    assert Decimal(line["saved_cost_usd"]) == paid.cost_usd

    with deps.db.session() as session:  # the usage report: hit rate and what the cache saved
        now = utcnow()
        report = usage_report(session, UsageQuery(now - timedelta(hours=1), now + timedelta(hours=1)), ())
    total = as_json(report)["total"]
    assert (total["requests"], total["served_from_cache"], total["cache_hit_rate"]) == (2, 1, 0.5)
    assert Decimal(total["saved_cost_usd"]) == paid.cost_usd
    assert lookups("hit") == hits_before + 1

    (stranger,) = _submit(deps, "cached", tenant="other")
    run_request(stranger, deps)
    theirs, attempts = _ended(deps, stranger)
    assert _calls(sim) == 2 and theirs.served_from is None and [a.outcome for a in attempts] == ["success"]


def test_refresh_replaces_the_entry_off_bypasses_it_and_an_evicted_one_is_only_a_miss(
    deps: Deps, sim: SimControl, redis: redis_lib.Redis
) -> None:
    (first,) = _submit(deps, "cached")
    run_request(first, deps)
    assert _calls(sim) == 1
    (fresh,) = _submit(deps, "cached", tags={"headrace_cache": "refresh"})
    run_request(fresh, deps)
    refreshed, _ = _ended(deps, fresh)
    assert _calls(sim) == 2 and refreshed.served_from is None
    (again,) = _submit(deps, "cached")
    run_request(again, deps)
    served, _ = _ended(deps, again)
    assert _calls(sim) == 2 and served.response == refreshed.response  # the refreshed answer

    (bypass,) = _submit(deps, "cached", tags={"headrace_cache": "off"})
    run_request(bypass, deps)
    assert _calls(sim) == 3 and _ended(deps, bypass)[0].served_from is None

    for key in redis.scan_iter("hrc:ans:*"):
        redis.delete(key)  # what an LRU eviction does
    (evicted,) = _submit(deps, "cached")
    run_request(evicted, deps)
    request, attempts = _ended(deps, evicted)
    assert _calls(sim) == 4 and request.status == "succeeded" and [a.outcome for a in attempts] == ["success"]

    (asked,) = _submit(deps, "plain", tags={"headrace_cache": "on"})  # a route without a cache
    run_request(asked, deps)
    (repeat,) = _submit(deps, "plain", tags={"headrace_cache": "on"})
    run_request(repeat, deps)
    assert _calls(sim) == 5 and _ended(deps, repeat)[0].served_from == "cache"


def test_identical_requests_in_flight_make_one_call(deps: Deps, sim: SimControl) -> None:
    """Eight identical requests at once: one call (slow, 600 ms), seven followers that hold no
    rate-limit room and end with its answer, each with its own attempt row at no cost."""
    ids = _submit(deps, "cached", f"[[sim:latency_ms=600]] {QUESTION}", n=8)
    threads = [threading.Thread(target=run_request, args=(rid, deps)) for rid in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ended = [_ended(deps, rid) for rid in ids]
    assert _calls(sim) == 1
    assert all(request.status == "succeeded" for request, _ in ended)
    outcomes = sorted(attempts[0].outcome for _, attempts in ended)
    assert outcomes == ["coalesced"] * 7 + ["success"]
    paid = next(request for request, attempts in ended if attempts[0].outcome == "success")
    for request, _ in ended:
        if request.id != paid.id:
            assert request.saved_cost_usd == paid.cost_usd and request.cost_usd == Decimal(0)
            assert result_line(request)["coalesced"] is True


def test_a_follower_of_a_dead_leader_makes_the_call_itself(
    deps: Deps, sim: SimControl, redis: redis_lib.Redis
) -> None:
    """The flight names a run whose lease is gone (its worker died): the follower takes it over
    at once and calls, rather than wait for an answer that will never come."""
    (rid,) = _submit(deps, "cached")
    with deps.db.session() as session:
        request = session.get(LlmRequest, rid)
        assert request is not None
        plan = plan_for(deps.config.resolve("cached"), "t", {}, request.body)  # type: ignore[arg-type]
    assert plan is not None
    redis.set(keys.flight(plan.key), "dead-request deadtoken", px=60_000)
    started = time.monotonic()
    run_request(rid, deps)
    request, attempts = _ended(deps, rid)
    assert request.status == "succeeded" and [a.outcome for a in attempts] == ["success"]
    assert _calls(sim) == 1 and time.monotonic() - started < 5
    assert redis.get(keys.flight(plan.key)) is None  # let go once answered


def test_a_question_worded_alike_is_served_by_meaning_and_a_different_one_is_not(
    deps: Deps, sim: SimControl
) -> None:
    """On a semantic route, the same question in other case and punctuation is served the first
    one's answer (noting how similar it was); a question about something else is not."""
    deps = _with_semantic(deps)
    (first,) = _submit(deps, "meaning")
    run_request(first, deps)
    (alike,) = _submit(deps, "meaning", "what is the boiling point of water at sea level")
    run_request(alike, deps)
    served, attempts = _ended(deps, alike)
    assert _calls(sim) == 1 and served.served_from == "semantic_cache"
    assert served.response == _ended(deps, first)[0].response and attempts[0].outcome == "cache_hit"
    assert result_line(served)["cached"] is True and result_line(served)["similarity"] >= 0.95
    (other,) = _submit(deps, "meaning", "What is the freezing point of water at sea level?")
    run_request(other, deps)
    assert _calls(sim) == 2 and _ended(deps, other)[0].served_from is None


def test_past_a_budgets_cache_only_step_what_is_cached_is_served_and_nothing_else_runs(
    deps: Deps, sim: SimControl, redis: redis_lib.Redis
) -> None:
    (first,) = _submit(deps, "cached")
    run_request(first, deps)
    rule = set_budget(deps.db, "t", "monthly", limit_usd=1, ladder="cache_only@0.5")
    redis.hset(rule.keys(period_bounds("month")[0])[0], "spent", "0.6")
    budgeted = replace(deps, budgets=Budgets(deps.db, redis, refresh_s=0.0))
    (repeat,) = _submit(budgeted, "cached")
    run_request(repeat, budgeted)
    (new,) = _submit(budgeted, "cached", "A question nobody asked before?")
    run_request(new, budgeted)
    assert _ended(budgeted, repeat)[0].served_from == "cache"
    held, attempts = _ended(budgeted, new)
    assert (held.status, attempts, _calls(sim)) == ("queued", [], 1)
    assert held.error is not None and held.error["kind"] == "budget_exhausted"
