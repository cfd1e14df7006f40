"""Chaos: while 1,000 requests run on 3 worker processes, workers are SIGKILLed every few seconds
and replaced, Redis is restarted once and PostgreSQL once. At the end every request has exactly
one result, nothing is lost, every provider call has its cost row, and every call the provider saw
is an attempt in the ledger."""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from db.engine import get_database
from db.models import Attempt, LlmRequest
from headrace.stack import EmbeddedStack
from tests.infra.postgres import PostgresCluster
from tests.test_end_to_end import lines

REQUESTS = 1000

pytestmark = pytest.mark.slow  # a stack under load for tens of seconds


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, postgres_cluster: PostgresCluster | None
) -> Iterator[EmbeddedStack]:
    if postgres_cluster is None or not postgres_cluster.restartable:
        pytest.skip("needs a PostgreSQL cluster the tests can restart")
    from tests.conftest import _fresh_postgres_db

    stack = EmbeddedStack(
        tmp_path_factory.mktemp("chaos"),
        database_url=_fresh_postgres_db(postgres_cluster.url),
        workers=3,
        worker_concurrency=6,
        simulator_args=("--latency-ms", "250", "--latency-jitter-ms", "100"),
        extra_env={
            "HEADRACE_LEASE_TTL_S": "3",
            "HEADRACE_SWEEP_INTERVAL_S": "1",
            "HEADRACE_PUBLISH_GRACE_S": "2",
            "HEADRACE_LOST_MESSAGE_CHECK_S": "5",
            "HEADRACE_CALL_TIMEOUT_S": "5",
            "HEADRACE_BACKOFF_MAX_S": "0.5",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _view(http: httpx.Client, batch_id: str) -> dict[str, Any] | None:
    """The batch, or None while the API cannot answer (its database is restarting)."""
    try:
        response = http.get(f"/v1/batches/{batch_id}")
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def test_kills_and_restarts_lose_nothing_and_duplicate_nothing(
    stack: EmbeddedStack, http: httpx.Client, postgres_cluster: PostgresCluster
) -> None:
    batch = http.post("/v1/batches", json={"requests": lines(REQUESTS, "c", ("fast",))}).json()["id"]
    began = time.monotonic()
    kills: list[float] = []
    replacements = 0
    plan = {9.0: "redis", 15.0: "postgres"}
    next_kill = 3.0
    while time.monotonic() - began < 21:
        elapsed = time.monotonic() - began
        for at, what in list(plan.items()):
            if elapsed >= at:
                del plan[at]
                stack.restart_redis() if what == "redis" else postgres_cluster.restart()
        if elapsed >= next_kill:
            victim = stack.workers_running()[0]
            victim.kill()  # SIGKILL: no warm shutdown, no message returned to the broker
            kills.append(time.time())
            replacements += 1
            stack.start_worker(f"worker-r{replacements}", wait=False)
            next_kill += 3.0
        time.sleep(0.1)

    deadline = time.monotonic() + 240
    view = None
    while time.monotonic() < deadline:
        view = _view(http, batch)
        if view is not None and view["status"] != "in_progress":
            break
        time.sleep(0.5)
    assert view is not None and view["status"] == "completed", view

    results = [json.loads(line) for line in http.get(f"/v1/batches/{batch}/results").text.splitlines()]
    assert len(results) == REQUESTS
    assert sorted(r["custom_id"] for r in results) == sorted(f"c-{i}" for i in range(REQUESTS))
    assert all(r["status"] == "succeeded" for r in results), [
        r for r in results if r["status"] != "succeeded"
    ][:3]

    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        ids = select(LlmRequest.id).where(LlmRequest.batch_id == batch)
        attempts = list(session.scalars(select(Attempt).where(Attempt.request_id.in_(ids))))
    assert all(a.outcome != "in_flight" for a in attempts), "every call has ended, or is known lost"
    assert all(a.cost_usd is not None for a in attempts), "every call has its cost row"
    lost = [a for a in attempts if a.outcome == "lost"]
    assert all(a.cost_estimated for a in lost) and lost, "killed calls are costed as estimates"

    stats = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 20000}, timeout=30).json()
    seen = [r["attempt"] for r in stats["records"] if r["attempt"]]
    ledger = {f"{a.request_id}:{a.attempt_no}": a for a in attempts}
    assert len(seen) == len(set(seen)), "no attempt reached the provider twice"
    assert set(seen) <= set(ledger), "every call the provider saw is an attempt in the ledger"
    assert all(ledger[key].outcome == "lost" for key in set(ledger) - set(seen)), (
        "attempts the provider never saw are only those whose worker died before sending them"
    )

    # Recovery: from a call lost with its worker to the next attempt of the same request.
    by_request: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        by_request.setdefault(attempt.request_id, []).append(attempt)
    recoveries = []
    for tries in by_request.values():
        tries.sort(key=lambda a: a.attempt_no)
        for before, after in itertools.pairwise(tries):
            if before.outcome == "lost":
                recoveries.append((after.started_at - before.started_at).total_seconds())
    print(
        f"\nchaos: {len(kills)} kills, {len(attempts)} attempts for {REQUESTS} requests, "
        f"{len(lost)} lost calls "
        f"(estimated), {len(seen)} calls seen by the provider; recovery after a kill: median "
        f"{statistics.median(recoveries):.1f}s, max {max(recoveries):.1f}s; batch ended "
        f"{time.monotonic() - began:.0f}s after submission"
    )
    assert max(recoveries) < 60
