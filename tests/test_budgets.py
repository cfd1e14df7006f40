"""Budgets: reserved with the rate-limit room in one Lua step (a real Redis), settled to the real
cost, expiring with a dead worker, rebuilt from the ledger; the ladder's steps; the admin API, the
CLI, and the 429 ``budget_exceeded`` at the three doors. The runs on the real stack (50 requests
against a budget with room for 10, a worker SIGKILLed) are in tests/test_budget_runs.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import select

from broker_config.budget_state import read_counts
from broker_config.deployments import Deployment, parse_config
from broker_config.settings import Settings
from db.budgets import BudgetError, BudgetRule, Step, parse_ladder, period_bounds, set_budget
from db.engine import get_database
from db.models import Attempt, LlmRequest
from db.types import utcnow
from tests import test_usage
from workers.admission import Estimate, admission_charges, admit, settle
from workers.bucket import Bucket, BudgetCharge
from workers.budgets import Budgets, Standing, ladder
from workers.metering import Settlement

DEPLOYMENT = Deployment(name="d", provider="openai", model="m", rpm=6000, tpm=6_000_000)
ESTIMATE = Estimate(prompt_tokens=10, output_tokens=10)


def _charge(name: str = "b", limit: float = 1.0, cost: float = 0.3, key: str = "k") -> BudgetCharge:
    return BudgetCharge(
        f"headrace:{{budget:t}}:{key}", f"headrace:{{budget:t}}:{key}:exp", name, limit, cost, 30.0, 3_600_000
    )


def _take(bucket: Bucket, budgets: tuple[BudgetCharge, ...], request_id: str, ttl_s: float = 60.0) -> object:
    return bucket.take(
        DEPLOYMENT.name,
        request_id,
        admission_charges(DEPLOYMENT, ESTIMATE),
        priority="default",
        ttl_s=ttl_s,
        budgets=budgets,
    )


def _counted(client: redis_lib.Redis, key: str = "k") -> tuple[float, float]:
    hash_key = f"headrace:{{budget:t}}:{key}"
    count = read_counts(client, [(hash_key, f"{hash_key}:exp")])[0]
    return count.spent or 0.0, count.held


def test_calls_in_flight_never_add_up_past_the_limit_and_settle_to_their_real_cost(
    redis: redis_lib.Redis,
) -> None:
    redis.hset("headrace:{budget:t}:k", "spent", "0")
    bucket = Bucket(redis)
    charge = _charge(cost=0.3)
    granted = [_take(bucket, (charge,), f"r{i}") for i in range(5)]
    assert [a.status for a in granted] == ["granted"] * 3 + ["budget"] * 2  # type: ignore[attr-defined]
    refused = granted[3]
    assert refused.reason == "budget:b" and refused.wait_s == 2.0  # type: ignore[attr-defined]  # in flight may give back
    assert _counted(redis) == (0.0, pytest.approx(0.9))
    bucket.settle_budgets((charge,), "r0", 0.05)  # answered for less than its worst case
    assert _counted(redis) == (pytest.approx(0.05), pytest.approx(0.6))
    assert _take(bucket, (charge,), "r5").status == "granted"  # type: ignore[attr-defined]
    bucket.settle_budgets((charge,), "r0", 0.05)  # twice: nothing more
    assert _counted(redis) == (pytest.approx(0.05), pytest.approx(0.9))


def test_a_budget_without_room_takes_no_rate_limit_room_and_a_refused_take_no_budget(
    redis: redis_lib.Redis,
) -> None:
    redis.hset("headrace:{budget:t}:k", "spent", "0.9")
    bucket = Bucket(redis)
    assert _take(bucket, (_charge(cost=0.3),), "r1").status == "budget"  # type: ignore[attr-defined]
    assert redis.hlen("headrace:{d}:resv") == 0
    # All or nothing the other way: a deployment out of room reserves nothing from the budget.
    tiny = Deployment(name="d", provider="openai", model="m", rpm=1, tpm=6_000_000)
    charges = admission_charges(tiny, ESTIMATE)
    first = bucket.take("d", "a", charges, priority="default", ttl_s=60, budgets=(_charge(cost=0.01),))
    second = bucket.take("d", "b", charges, priority="default", ttl_s=60, budgets=(_charge(cost=0.01),))
    assert (first.status, second.status) == ("granted", "wait")
    assert _counted(redis) == (pytest.approx(0.9), pytest.approx(0.01))


def test_a_spent_budget_waits_for_its_period_and_a_lost_count_asks_for_a_rebuild(
    redis: redis_lib.Redis,
) -> None:
    bucket = Bucket(redis)
    lost = _take(bucket, (_charge(),), "r1")
    assert (lost.status, lost.wait_s) == ("budget", 1.0)  # type: ignore[attr-defined]  # no count: rebuild first
    redis.hset("headrace:{budget:t}:k", "spent", "0.8")
    spent = _take(bucket, (_charge(),), "r2")
    assert (spent.status, spent.wait_s) == ("budget", 30.0)  # type: ignore[attr-defined]  # nothing in flight


def test_a_dead_workers_reservation_expires_and_counts_at_what_it_held(redis: redis_lib.Redis) -> None:
    redis.hset("headrace:{budget:t}:k", "spent", "0")
    clock = [time.time() * 1000]  # readers use the server's clock
    bucket = Bucket(redis, clock_ms=lambda: clock[0])
    assert _take(bucket, (_charge(cost=0.4),), "dead", ttl_s=5).status == "granted"  # type: ignore[attr-defined]
    clock[0] += 6_000
    assert _take(bucket, (_charge(cost=0.4),), "next", ttl_s=5).status == "granted"  # type: ignore[attr-defined]
    assert _counted(redis) == (pytest.approx(0.4), pytest.approx(0.4))
    assert int(redis.hget("headrace:{budget:t}:k", "n:expired") or 0) == 1
    bucket.settle_budgets((_charge(cost=0.4),), "dead", 0.1)  # its late settlement changes nothing
    assert _counted(redis) == (pytest.approx(0.4), pytest.approx(0.4))


def test_several_budgets_are_reserved_together_or_not_at_all(redis: redis_lib.Redis) -> None:
    for key, spent in (("a", "0"), ("b", "0.5")):
        redis.hset(f"headrace:{{budget:t}}:{key}", "spent", spent)
    bucket = Bucket(redis)
    both = (_charge("tenant", 10.0, 0.4, "a"), _charge("search", 1.0, 0.4, "b"))
    assert _take(bucket, both, "r1").status == "granted"  # type: ignore[attr-defined]
    refused = _take(bucket, both, "r2")
    assert refused.reason == "budget:search"  # type: ignore[attr-defined]
    assert _counted(redis, "a") == (0.0, pytest.approx(0.4))


def test_admission_settles_the_budget_with_the_call(redis: redis_lib.Redis) -> None:
    redis.hset("headrace:{budget:t}:k", "spent", "0")
    bucket = Bucket(redis)
    ticket = admit(
        bucket,
        DEPLOYMENT,
        ESTIMATE,
        request_id="r",
        priority="default",
        tenant=None,
        max_inline_wait_s=1,
        sleep=lambda s: None,
        budgets=(_charge(cost=0.3),),
    )
    assert ticket.budgets  # type: ignore[union-attr]
    settle(bucket, ticket, Settlement(used={}), cost_usd=Decimal("0.125"))  # type: ignore[arg-type]
    assert _counted(redis) == (pytest.approx(0.125), pytest.approx(0.0))


# --- The ladder --------------------------------------------------------------------------------

CONFIG = parse_config(
    """
[[deployments]]
name = "big"
provider = "openai"
model = "gpt-4o"
[[deployments]]
name = "small"
provider = "openai"
model = "gpt-4o-mini"
[[routes]]
name = "smart"
deployments = ["big"]
[[routes]]
name = "fast"
deployments = ["small"]
""",
    Path("budgets.toml"),
)


def _standing(spent: float, steps: str, limit: str = "10") -> Standing:
    rule = BudgetRule(
        "bud_1", "ten_1", "acme", "monthly", None, None, "month", Decimal(limit), parse_ladder(steps)
    )
    start, end = period_bounds("month")
    return Standing(rule, start, end, spent, 0.0)


def test_the_ladder_adds_up_its_steps_as_spend_climbs() -> None:
    smart = CONFIG.resolve("smart")
    assert smart is not None
    steps = "defer@0.5,downgrade@0.8:smart>fast,refuse@1"
    assert ladder("bulk", smart, [_standing(4.9, steps)], CONFIG, 30) == ladder("bulk", smart, [], CONFIG, 30)
    deferred = ladder("bulk", smart, [_standing(5.0, steps)], CONFIG, 30)
    assert deferred.hold is not None and deferred.hold.kind == "budget_deferred"
    assert "'monthly'" in deferred.hold.message and deferred.hold.recheck_s == 30
    interactive = ladder("interactive", smart, [_standing(5.0, steps)], CONFIG, 30)
    assert interactive.hold is None and interactive.route is None
    down = ladder("interactive", smart, [_standing(8.5, steps)], CONFIG, 30)
    assert down.route is not None and down.route.name == "fast"
    assert down.notes == {"route": "fast", "downgraded_from": "smart", "downgraded_by": "monthly"}
    assert ladder("bulk", smart, [_standing(8.5, steps)], CONFIG, 30).hold is not None  # defer still holds
    refused = ladder("interactive", smart, [_standing(10.0, steps)], CONFIG, 30)
    assert refused.hold is not None and refused.hold.kind == "budget_exhausted"
    assert refused.hold.detail and refused.hold.detail["resets_at"].endswith("Z")  # type: ignore[union-attr]


def test_cache_only_without_a_cache_is_the_next_step() -> None:
    smart = CONFIG.resolve("smart")
    assert smart is not None
    next_down = ladder(
        "interactive", smart, [_standing(9, "cache_only@0.8,downgrade@0.9:smart>fast")], CONFIG, 30
    )
    assert next_down.route is not None and next_down.route.name == "fast"
    last = ladder("interactive", smart, [_standing(9, "defer@0.5,cache_only@0.8")], CONFIG, 30)
    assert last.hold is not None and last.hold.kind == "budget_exhausted"


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("defer@1.5", "at most 1"),
        ("defer@0.9,downgrade@0.8:a>b", "in order"),
        ("refuse@0.8,refuse@0.9", "refuse must be the last"),
        ("downgrade@0.9", "downgrade needs routes"),
        ("stop@0.9", "action must be one of"),
        ("defer", "expected action@share"),
        ("downgrade@0.9:smart", "route>cheaper_route"),
    ],
)
def test_a_bad_ladder_is_refused_naming_the_step(spec: str, says: str) -> None:
    with pytest.raises(BudgetError, match=says):
        parse_ladder(spec)


def test_periods_are_utc_days_and_months() -> None:
    now = datetime(2026, 12, 31, 23, 59, tzinfo=UTC)
    assert period_bounds("day", now) == (datetime(2026, 12, 31, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period_bounds("month", now) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("month", now + timedelta(days=40))[0] == datetime(2027, 2, 1, tzinfo=UTC)


# --- Kept in the ledger; rebuilt from it; the API --------------------------------------------

MSG = [{"role": "user", "content": "hello"}]
# The API on the test's ledger and Redis, and keys for it: as the usage report's tests have them.
settings, client, _key = test_usage.settings, test_usage.client, test_usage._key


def _submit(client: TestClient, headers: dict[str, str], feature: str, n: int = 1) -> httpx.Response:
    lines = [{"custom_id": f"{feature}-{i}", "body": {"model": "fast", "messages": MSG}} for i in range(n)]
    return client.post(
        "/v1/batches", json={"requests": lines, "metadata": {"feature": feature}}, headers=headers
    )


def _spend(settings: Settings, batch_id: str, cost: str) -> None:
    """One costed call for each request of the batch, as a worker would have written it."""
    with get_database(settings.database_url).write() as session:
        for request in session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id)):
            session.add(
                Attempt(
                    request_id=request.id,
                    attempt_no=1,
                    deployment="openai-mini",
                    provider="openai",
                    model="m",
                    started_at=utcnow(),
                    outcome="success",
                    cost_usd=Decimal(cost),
                )
            )


def test_budgets_are_kept_in_the_ledger_and_their_count_rebuilt_from_its_cost_rows(
    client: TestClient, settings: Settings, redis: redis_lib.Redis
) -> None:
    acme = _key(settings, "acme")
    db = get_database(settings.database_url)
    with pytest.raises(BudgetError, match="no tenant named 'nobody'"):
        set_budget(db, "nobody", "b", limit_usd=1)
    rule = set_budget(
        db, "acme", "search", limit_usd="2.5", period="day", tag="feature=search", ladder="refuse@0.9"
    )
    again = set_budget(db, "acme", "search", limit_usd="3", period="day", tag="feature=search")
    assert again.id == rule.id and again.limit_usd == Decimal(3) and again.ladder == (Step(1.0, "refuse"),)
    _spend(settings, _submit(client, acme, "search", 3).json()["id"], "0.25")
    _spend(settings, _submit(client, acme, "chat").json()["id"], "0.5")
    budgets = Budgets(db, redis)
    [search] = budgets.applicable("acme", {"feature": "search"})
    assert budgets.applicable("acme", {"feature": "chat"}) == []
    [standing] = budgets.standings([search])
    assert standing.spent == pytest.approx(0.75)  # from the ledger: Redis had nothing
    redis.hset(standing.keys()[0], "spent", "0.8")
    assert budgets.standings([search])[0].spent == pytest.approx(0.8)  # Redis's count, once it has one


def test_the_admin_api_sets_lists_and_deletes_budgets(client: TestClient, settings: Settings) -> None:
    demo, ops = _key(settings, "demo"), _key(settings, "ops", admin=True)
    body = {"limit_usd": "5", "period": "day", "tag": "feature=search", "ladder": "defer@0.8,refuse@1"}
    denied = client.put("/v1/budgets/demo/search", json=body, headers=demo)
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    created = client.put("/v1/budgets/demo/search", json=body, headers=ops)
    assert created.status_code == 200, created.text
    assert created.json()["ladder"] == [{"at": 0.8, "action": "defer"}, {"at": 1.0, "action": "refuse"}]
    listed = [{"at": 0.5, "action": "downgrade", "routes": {"smart": "fast"}}]
    assert (
        client.put("/v1/budgets/demo/all", json={"limit_usd": 9, "ladder": listed}, headers=ops).status_code
        == 200
    )
    bad = client.put("/v1/budgets/demo/x", json={**body, "ladder": "refuse@0.5,defer@0.9"}, headers=ops)
    assert bad.status_code == 400 and "refuse must be the last step" in bad.json()["error"]["message"]
    assert client.put("/v1/budgets/nobody/x", json=body, headers=ops).status_code == 404
    mine = {b["name"]: b for b in client.get("/v1/budgets", headers=demo).json()["data"]}
    assert (mine["search"]["spent_usd"], mine["search"]["steps_reached"]) == ("0.000000", [])
    assert mine["search"]["resets_at"].endswith("T00:00:00Z") and mine["all"]["period"] == "month"
    assert client.get("/v1/budgets", headers=_key(settings, "beta")).json()["data"] == []
    scraped = client.get("/metrics").text
    assert 'headrace_budget_limit_usd{budget="search",period="day",tenant="demo"} 5.0' in scraped
    assert 'headrace_budget_spent_usd{budget="all",period="month",tenant="demo"} 0.0' in scraped
    assert len(client.get("/v1/budgets", headers=ops).json()["data"]) == 2
    assert client.delete("/v1/budgets/demo/search", headers=ops).status_code == 200
    assert client.delete("/v1/budgets/demo/search", headers=ops).status_code == 404
    assert [b["name"] for b in client.get("/v1/budgets", headers=demo).json()["data"]] == ["all"]


def test_a_budget_past_its_refuse_step_refuses_new_batches_at_every_door(
    client: TestClient, settings: Settings
) -> None:
    acme = _key(settings, "acme")
    db = get_database(settings.database_url)
    set_budget(
        db, "acme", "search", limit_usd="1", period="day", tag="feature=search", ladder="defer@0.5,refuse@0.9"
    )
    _spend(settings, _submit(client, acme, "search").json()["id"], "0.95")
    assert _submit(client, acme, "chat").status_code == 201  # other features are not its business
    refused = _submit(client, acme, "search")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded" and "budget 'search'" in error["message"]
    assert "resets at" in error["message"] and int(refused.headers["retry-after"]) > 0
    # A line of another batch that is tagged search is work for the budget too.
    mixed = {"custom_id": "m", "body": {"model": "fast", "messages": MSG}, "metadata": {"feature": "search"}}
    assert client.post("/v1/batches", json={"requests": [mixed]}, headers=acme).status_code == 429
    # The OpenAI and Anthropic doors answer in their own dialect, with the same type.
    jsonl = json.dumps(
        {
            "custom_id": "o",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "fast", "messages": MSG},
        }
    )
    file_id = client.post(
        "/openai/v1/files",
        files={"file": ("in.jsonl", jsonl.encode())},
        data={"purpose": "batch"},
        headers=acme,
    ).json()["id"]
    openai_batch = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"feature": "search"},
    }
    by_openai = client.post("/openai/v1/batches", json=openai_batch, headers=acme)
    assert by_openai.status_code == 429 and by_openai.json()["error"]["code"] == "budget_exceeded"
    anthropic_batch = {
        "requests": [{"custom_id": "a", "params": {"model": "fast", "max_tokens": 10, "messages": MSG}}],
        "metadata": {"feature": "search"},
    }
    anthropic_headers = {**acme, "anthropic-version": "2023-06-01"}
    by_anthropic = client.post(
        "/anthropic/v1/messages/batches", json=anthropic_batch, headers=anthropic_headers
    )
    assert by_anthropic.status_code == 429, by_anthropic.text
    assert by_anthropic.json()["error"]["type"] == "budget_exceeded"
    # Nothing of what was refused was kept.
    assert len(client.get("/v1/batches", headers=acme).json()["data"]) == 2
