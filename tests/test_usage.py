"""GET /v1/usage and `headrace usage`: grouped by tags, route, tenant and day; sums that are the
ledger's cost rows exactly; a tenant's key sees its own tenant, an admin key every one."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from broker_config.settings import Settings
from db.engine import get_database
from db.models import Attempt, Batch, LlmRequest
from db.states import RequestStatus
from db.tenants import create_api_key
from db.types import utcnow
from headrace.cli.usage import rows_of
from headrace.stack import DEFAULT_CONFIG

MSG = [{"role": "user", "content": "hello"}]
# Per request (by its line's position): the calls it made, as (deployment, outcome, in, out, cost).
CALLS = [
    [("openai-mini", "success", 10, 5, "0.0010")],
    [("openai-mini", "retry", 10, 0, "0.0004"), ("openai-mini", "success", 10, 7, "0.0012")],
    [("openai-mini", "fallback", 12, 0, "0.0003"), ("claude-haiku", "success", 12, 9, "0.0020")],
    [("claude-haiku", "lost", 20, 40, "0.0050")],
    [("claude-haiku", "fail", 30, 0, None)],  # refused, unpriced
]


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(database_url=database_url, redis_url=redis_url, config=config)


@pytest.fixture
def client(settings: Settings, redis: redis_lib.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _key(settings: Settings, tenant: str, *, admin: bool = False) -> dict[str, str]:
    key = create_api_key(get_database(settings.database_url), tenant, admin=admin).key
    return {"Authorization": f"Bearer {key}"}


def _submit(
    client: TestClient, headers: dict[str, str], feature: str, route: str, users: list[str | None]
) -> str:
    lines = []
    for i, user in enumerate(users):
        line: dict[str, object] = {"custom_id": f"{feature}-{i}", "body": {"model": route, "messages": MSG}}
        if user is not None:
            line["metadata"] = {"user": user}
        lines.append(line)
    response = client.post(
        "/v1/batches", json={"requests": lines, "metadata": {"feature": feature}}, headers=headers
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _run_calls(settings: Settings, batch_id: str, days_ago: int = 0) -> None:
    """Each request of the batch makes CALLS[line]'s calls and ends as the last one decides, with
    the ledger's figures: a request's tokens and cost are the sums of its calls'."""
    db = get_database(settings.database_url)
    with db.write() as session:
        requests = session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id)).all()
        for request in requests:
            calls = CALLS[request.line_no % len(CALLS)]
            request.created_at -= timedelta(days=days_ago)
            for number, (deployment, outcome, tokens_in, tokens_out, cost) in enumerate(calls, start=1):
                cache_read = tokens_in // 2 if outcome == "success" else 0  # half its prompt cached
                session.add(
                    Attempt(
                        request_id=request.id,
                        attempt_no=number,
                        deployment=deployment,
                        provider="openai",
                        model="m",
                        started_at=request.created_at,
                        outcome=outcome,
                        input_tokens=tokens_in,
                        output_tokens=tokens_out,
                        cache_read_tokens=cache_read,
                        cost_usd=Decimal(cost) if cost else None,
                    )
                )
                request.input_tokens += tokens_in
                request.output_tokens += tokens_out
                request.cache_read_tokens += cache_read
                request.cost_usd += Decimal(cost) if cost else Decimal(0)
                request.attempt_count += 1
                request.unpriced_attempts += cost is None
                if outcome != "success":
                    request.overhead_cost_usd += Decimal(cost) if cost else Decimal(0)
            last = calls[-1][1]
            request.status = RequestStatus.SUCCEEDED if last == "success" else RequestStatus.FAILED
            request.deployment = calls[-1][0]


def _ledger_cost(settings: Settings, tenant_batches: list[str]) -> dict[tuple[str, str], Decimal]:
    """The ledger's cost rows summed per (feature, user): straight from the attempts."""
    sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    with get_database(settings.database_url).session() as session:
        rows = session.execute(
            select(Batch.metadata_, LlmRequest.tags, Attempt.cost_usd)
            .join(LlmRequest, LlmRequest.batch_id == Batch.id)
            .join(Attempt, Attempt.request_id == LlmRequest.id)
            .where(Batch.id.in_(tenant_batches))
        )
        for metadata, tags, cost in rows:
            key = ((tags or {}).get("feature", metadata["feature"]), (tags or {}).get("user", "(none)"))
            sums[key] += cost or Decimal(0)
    return sums


def test_a_report_grouped_by_tags_is_the_ledgers_cost_rows_exactly(
    client: TestClient, settings: Settings
) -> None:
    acme = _key(settings, "acme")
    batches = [
        _submit(client, acme, "search", "fast", ["u1", "u2", None, "u1", None]),
        _submit(client, acme, "chat", "smart", [None, None, "u2", None, "u1"]),
    ]
    for batch_id in batches:
        _run_calls(settings, batch_id)
    other = _submit(client, _key(settings, "beta"), "search", "fast", [None] * 5)
    _run_calls(settings, other)

    report = client.get("/v1/usage", params={"group_by": "feature,user"}, headers=acme).json()
    got = {(g["group"]["feature"], g["group"]["user"]): Decimal(g["cost_usd"]) for g in report["data"]}
    expected = {k: v for k, v in _ledger_cost(settings, batches).items()}
    assert got == expected
    total = report["total"]
    assert Decimal(total["cost_usd"]) == sum(expected.values()) == 2 * Decimal("0.0099")
    assert total["requests"] == 10 and total["succeeded"] == 6 and total["failed"] == 4
    assert total["attempts"] == 14 and total["unpriced_attempts"] == 2
    # Overhead: the retry, the fallback and the lost call; the refused one cost nothing.
    assert Decimal(total["overhead_cost_usd"]) == 2 * Decimal("0.0057")
    assert Decimal(total["cost_per_success_usd"]) == (2 * Decimal("0.0099") / 6).quantize(Decimal("1e-10"))
    assert total["input_tokens"]["sum"] == 2 * (10 + 20 + 24 + 20 + 30)
    assert total["cache_read_tokens"] == 2 * (5 + 5 + 6) and total["cache_write_tokens"] == 0
    per_request_in = sorted([10, 20, 24, 20, 30] * 2)
    assert total["input_tokens"]["p50"] == per_request_in[4] and total["input_tokens"]["p95"] == 30
    assert total["input_tokens"]["mean"] == sum(per_request_in) / 10


def test_by_route_deployment_and_day_and_what_each_key_may_see(
    client: TestClient, settings: Settings
) -> None:
    acme, beta, ops = _key(settings, "acme"), _key(settings, "beta"), _key(settings, "ops", admin=True)
    _run_calls(settings, _submit(client, acme, "search", "fast", [None] * 5), days_ago=1)
    _run_calls(settings, _submit(client, beta, "chat", "smart", [None] * 5))

    by_day = client.get("/v1/usage", params={"group_by": "route", "granularity": "day"}, headers=acme).json()
    assert [(g["group"]["route"], g["requests"]) for g in by_day["data"]] == [("fast", 5)]
    yesterday = (utcnow() - timedelta(days=1)).strftime("%Y-%m-%d")
    assert by_day["data"][0]["group"]["day"] == yesterday

    by_deployment = client.get("/v1/usage", params={"group_by": "deployment"}, headers=beta).json()
    calls = {g["group"]["deployment"]: (g["attempts"], Decimal(g["cost_usd"])) for g in by_deployment["data"]}
    assert calls == {"openai-mini": (4, Decimal("0.0029")), "claude-haiku": (3, Decimal("0.0070"))}
    cached = {g["group"]["deployment"]: g["cache_read_tokens"] for g in by_deployment["data"]}
    assert cached == {"openai-mini": 5 + 5, "claude-haiku": 6}

    refused = client.get("/v1/usage", params={"group_by": "tenant"}, headers=acme)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    every = client.get("/v1/usage", params={"group_by": "tenant"}, headers=ops).json()
    assert {g["group"]["tenant"]: g["requests"] for g in every["data"]} == {"acme": 5, "beta": 5}
    one = client.get("/v1/usage", params={"tenant": "beta"}, headers=ops).json()
    assert one["total"]["requests"] == 5
    recent = client.get("/v1/usage", params={"since": "12h"}, headers=ops).json()
    assert recent["total"]["requests"] == 5, "acme's requests were accepted a day ago"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"group_by": "colour"},
            "group_by: colour: choose from tenant, route, deployment, priority, feature, user",
        ),
        ({"group_by": "route,route"}, "group_by: a dimension twice"),
        ({"since": "last tuesday"}, "since: 'last tuesday' is neither a time"),
        ({"since": "1d", "until": "2d"}, "since must come before until"),
        ({"granularity": "week"}, "granularity: day or hour"),
    ],
)
def test_a_bad_report_question_is_a_400_that_names_what_is_wrong(
    client: TestClient, settings: Settings, params: dict[str, str], message: str
) -> None:
    response = client.get("/v1/usage", params=params, headers=_key(settings, "acme"))
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(message)


def test_the_cli_prints_the_groups_then_the_total() -> None:
    report = {
        "group_by": ["feature"],
        "granularity": None,
        "data": [
            {"group": {"feature": "search"}, "requests": 3, "cost_usd": "0.5", "input_tokens": {"sum": 9}}
        ],
        "total": {"requests": 3, "cost_usd": "0.5", "input_tokens": {"sum": 9}},
    }
    header, rows = rows_of(report)
    assert header[:3] == ["feature", "requests", "ok"]
    assert rows[0][:2] == ["search", "3"] and rows[-1][:2] == ["total", "3"]
    assert rows[0][header.index("tok in")] == "9" and rows[0][header.index("cost USD")] == "0.5"
