"""The ladder's holds on a run (the pipeline against the simulator, a real Redis and ledger): a
budget past ``defer`` parks bulk and default work and lets interactive run; past ``refuse`` it
parks everything; each held request waits in the delay queue with the budget as its reason and
runs once the budget has room; one whose deadline comes while it is held ends ``expired``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis as redis_lib
from sqlalchemy import select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from broker_config import keys
from db.budgets import period_bounds, set_budget
from db.models import Attempt, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from tests.test_pipeline import compat_url, deps  # noqa: F401  (fixtures)
from workers.budgets import Budgets
from workers.pipeline import Deps, run_request


@pytest.fixture
def budgeted(deps: Deps, redis: redis_lib.Redis) -> Deps:  # noqa: F811
    settings = deps.settings.model_copy(update={"hold_recheck_s": 5.0})
    return replace(deps, settings=settings, budgets=Budgets(deps.db, redis, refresh_s=0.0))


def _submit(pool: Deps, priority: Priority, route: str = "chain") -> str:
    tenant = create_api_key(pool.db, "t").tenant_id
    body = {"model": route, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    batch = create_batch(pool.db, BatchSpec(tenant, priority, None, 3600), [BatchLine(1, "c", route, body)])
    with pool.db.session() as session:
        return str(session.scalar(select(LlmRequest.id).where(LlmRequest.batch_id == batch.id)))


def _spent(pool: Deps, redis: redis_lib.Redis, usd: float) -> None:
    create_api_key(pool.db, "t")  # the tenant, on first use
    rule = set_budget(pool.db, "t", "monthly", limit_usd=1, ladder="defer@0.5,refuse@0.9")
    redis.hset(rule.keys(period_bounds("month")[0])[0], "spent", repr(usd))


def _request(pool: Deps, request_id: str) -> tuple[LlmRequest, int]:
    with pool.db.session() as session:
        request = session.get(LlmRequest, request_id)
        calls = len(list(session.scalars(select(Attempt).where(Attempt.request_id == request_id))))
    assert request is not None
    return request, calls


def test_defer_parks_bulk_and_default_work_and_lets_interactive_run(
    budgeted: Deps, redis: redis_lib.Redis
) -> None:
    _spent(budgeted, redis, 0.6)
    bulk, interactive = _submit(budgeted, Priority.BULK), _submit(budgeted, Priority.INTERACTIVE)
    run_request(bulk, budgeted)
    run_request(interactive, budgeted)
    held, calls = _request(budgeted, bulk)
    assert (held.status, calls, held.error["kind"]) == ("queued", 0, "budget_deferred")  # type: ignore[index]
    assert "budget 'monthly'" in held.error["message"] and held.error["resets_at"]  # type: ignore[index]
    assert redis.zscore(keys.delayed_requests(), f"bulk|{bulk}") is not None  # parked, not in a slot
    assert _request(budgeted, interactive)[0].status == "succeeded"

    _spent(budgeted, redis, 0.95)  # past refuse: interactive waits too
    late = _submit(budgeted, Priority.INTERACTIVE)
    run_request(late, budgeted)
    assert _request(budgeted, late)[0].error["kind"] == "budget_exhausted"  # type: ignore[index]

    _spent(budgeted, redis, 0.1)  # a new period, or a raised limit: the held work runs
    run_request(bulk, budgeted)
    run_request(late, budgeted)
    assert _request(budgeted, bulk)[0].status == "succeeded"
    assert _request(budgeted, late)[0].status == "succeeded"


def test_a_request_whose_deadline_comes_while_it_is_held_ends_expired_saying_why(
    budgeted: Deps, redis: redis_lib.Redis
) -> None:
    _spent(budgeted, redis, 0.95)
    rid = _submit(budgeted, Priority.INTERACTIVE, route="hurried")  # deadline 1.5 s < the recheck
    run_request(rid, budgeted)
    request, calls = _request(budgeted, rid)
    assert (request.status, calls) == ("expired", 0)
    assert request.error["held_by"] == "budget_exhausted"  # type: ignore[index]
    assert "its deadline came while it was held: budget 'monthly'" in request.error["message"]  # type: ignore[index]
