"""The whole path over HTTP: API and Celery workers as subprocesses, the official SDKs against
the simulator, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletion
from sqlalchemy import func, select

from db.engine import get_database
from db.models import Attempt, LlmRequest
from headrace.stack import EmbeddedStack

ENDED = {"completed", "cancelled", "expired", "failed"}


def lines(n: int, prefix: str, routes: tuple[str, ...]) -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "body": {
                "model": routes[i % len(routes)],
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Question {i}: " + "why? " * (i % 17)},
                ],
                "max_tokens": 16 + i % 48,
                "temperature": 0.3,
            },
        }
        for i in range(n)
    ]


def wait_ended(
    http: httpx.Client, batch_ids: list[str], timeout_s: float = 180
) -> dict[str, dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = {b: http.get(f"/v1/batches/{b}").json() for b in batch_ids}
        if all(v["status"] in ENDED for v in views.values()):
            return views
        time.sleep(0.3)
    raise AssertionError(f"batches did not end within {timeout_s}s: {views}")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres_server: str | None
) -> Iterator[EmbeddedStack]:
    database_url = None
    if request.param == "postgresql":
        if postgres_server is None:
            pytest.skip("no PostgreSQL available")
        from tests.conftest import _fresh_postgres_db

        database_url = _fresh_postgres_db(postgres_server)
    stack = EmbeddedStack(
        tmp_path_factory.mktemp(f"stack-{request.param}"),
        database_url=database_url,
        worker_concurrency=16,
        # 5% of calls fail (500 / 529): retries must keep every request and cost every call.
        simulator_args=(
            "--latency-ms",
            "20",
            "--latency-jitter-ms",
            "15",
            "--fault-rate",
            "0.05",
            "--faults",
            "500,529",
            "--seed",
            "7",
        ),
        extra_env={"HEADRACE_BACKOFF_BASE_S": "0.05", "HEADRACE_BACKOFF_MAX_S": "0.2"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.slow
def test_300_requests_over_two_priorities_and_routes_come_back_once_each_with_their_cost(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    """Every custom_id exactly once, parsed by the OpenAI SDK's types; one attempt row per provider
    call (the simulator's own count); the batch's cost is the sum of its attempts' costs."""
    before = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 0}).json()
    submitted = {
        "interactive": lines(100, "i", ("fast", "smart")),
        "bulk": lines(200, "b", ("smart", "fast")),
    }
    batch_ids = []
    for priority, batch_lines in submitted.items():
        response = http.post("/v1/batches", json={"requests": batch_lines, "priority": priority})
        assert response.status_code == 201, response.text
        batch_ids.append(response.json()["id"])
    views = wait_ended(http, batch_ids)

    results: dict[str, dict[str, object]] = {}
    for batch_id in batch_ids:
        with http.stream("GET", f"/v1/batches/{batch_id}/results") as response:
            for raw in response.iter_lines():
                line = json.loads(raw)
                assert line["custom_id"] not in results, f"{line['custom_id']} twice"
                results[line["custom_id"]] = line
    expected = {line["custom_id"] for group in submitted.values() for line in group}
    assert set(results) == expected
    assert all(r["status"] == "succeeded" for r in results.values()), [
        r for r in results.values() if r["status"] != "succeeded"
    ][:3]
    for line in results.values():
        completion = ChatCompletion.model_validate(line["response"]["body"])  # type: ignore[index]
        assert completion.choices[0].message.content and completion.usage is not None
    by_route = {"fast": {"openai-mini", "claude-haiku"}, "smart": {"claude-sonnet", "openai-4o"}}
    for group in submitted.values():
        for line in group:
            assert results[str(line["custom_id"])]["deployment"] in by_route[line["body"]["model"]]  # type: ignore[index]

    after = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 0}).json()
    calls = sum(after["received"].values()) - sum(before["received"].values())
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    with db.session() as session:
        request_ids = select(LlmRequest.id).where(LlmRequest.batch_id.in_(batch_ids))
        attempts = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.request_id.in_(request_ids))
        )
        attempt_cost = session.scalar(
            select(func.sum(Attempt.cost_usd)).where(Attempt.request_id.in_(request_ids))
        )
        retried = session.scalar(
            select(func.count())
            .select_from(Attempt)
            .where(Attempt.request_id.in_(request_ids), Attempt.outcome != "success")
        )
    assert attempts == calls, "every provider call has exactly one attempt row"
    with db.session() as session:  # each request keeps what its calls that did not answer cost
        overhead = dict(
            session.execute(
                select(Attempt.request_id, func.sum(Attempt.cost_usd))
                .where(Attempt.request_id.in_(request_ids), Attempt.outcome != "success")
                .group_by(Attempt.request_id)
            ).all()
        )
        kept = dict(
            session.execute(
                select(LlmRequest.id, LlmRequest.overhead_cost_usd).where(LlmRequest.batch_id.in_(batch_ids))
            ).all()
        )
    assert {k: v for k, v in kept.items() if v} == {k: v for k, v in overhead.items() if v}
    assert retried > 0, "the simulator's faults were retried"
    api_cost = sum(Decimal(v["cost_usd"]) for v in views.values())  # type: ignore[arg-type]
    line_cost = sum(Decimal(str(r["cost_usd"])) for r in results.values())
    assert api_cost == attempt_cost == line_cost > 0
    assert all(v["request_counts"]["completed"] == len(submitted[str(v["priority"])]) for v in views.values())  # type: ignore[index]


@pytest.mark.slow
def test_a_request_the_provider_rejects_fails_at_once_with_the_providers_error(http: httpx.Client) -> None:
    """A 400 is the request's fault: failed after one call, no retry, the error in its result line."""
    bad = lines(1, "bad", ("fast",))
    bad[0]["body"]["messages"][-1]["content"] = "[[sim:status=400]] this is wrong"  # type: ignore[index]
    batch_id = http.post("/v1/batches", json={"requests": bad, "priority": "interactive"}).json()["id"]
    view = wait_ended(http, [batch_id])[batch_id]
    assert view["request_counts"]["failed"] == 1  # type: ignore[index]
    line = json.loads(http.get(f"/v1/batches/{batch_id}/results").text)
    assert line["status"] == "failed" and line["attempts"] == 1 and line["error"]["status"] == 400


@pytest.mark.slow
def test_the_cli_submits_waits_and_downloads(
    stack: EmbeddedStack, tmp_path: Path, run_cli: Callable[..., str]
) -> None:
    """`headrace submit --wait`, `status`, `results -o` against the running API."""
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(
            json.dumps({"custom_id": f"c{i}", "body": {"messages": [{"role": "user", "content": f"hi {i}"}]}})
            + "\n"
            for i in range(20)
        )
    )
    env = {"HEADRACE_API_URL": stack.api_url, "HEADRACE_API_KEY": stack.api_key}
    batch_id = run_cli(
        "submit", str(source), "--route", "fast", "--priority", "interactive", "--wait", env=env
    ).strip()
    status = json.loads(run_cli("status", batch_id, env=env))
    assert status["status"] == "completed" and status["request_counts"]["completed"] == 20
    out = tmp_path / "out.jsonl"
    run_cli("results", batch_id, "-o", str(out), env=env)
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == sorted(
        f"c{i}" for i in range(20)
    )
