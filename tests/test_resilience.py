"""Providers that fail: random 500/529s, hung calls, a 30 s outage of the primary. Every request
comes back exactly once, answered by the best deployment that could, with every call costed."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
import redis as redis_lib
from sqlalchemy import func, select

from db.engine import get_database
from db.models import Attempt, LlmRequest
from headrace.simulator.config import SimConfig
from headrace.simulator.server import running_simulator
from headrace.stack import EmbeddedStack
from tests.test_end_to_end import lines, wait_ended

BREAKER_WINDOW_S, BREAKER_OPEN_S = 10, 3

pytestmark = pytest.mark.slow  # a stack under load for tens of seconds

CONFIG = """
[[deployments]]
name = "primary"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = 100000
tpm = 100000000

[[deployments]]
name = "secondary"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{secondary}"
api_key_env = "{{key_env}}"
rpm = 100000
tpm = 100000000

[[routes]]
name = "main"
deployments = ["primary", "secondary"]
"""


@pytest.fixture(scope="module")
def secondary_url() -> Iterator[str]:
    with running_simulator(SimConfig(latency_ms=20)) as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, secondary_url: str) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("resilience"),
        config_template=CONFIG.format(secondary=secondary_url),
        workers=2,
        worker_concurrency=8,
        simulator_args=("--latency-ms", "20", "--seed", "11"),
        extra_env={
            "HEADRACE_CALL_TIMEOUT_S": "1",
            "HEADRACE_BACKOFF_BASE_S": "0.05",
            "HEADRACE_BACKOFF_MAX_S": "0.2",
            "HEADRACE_MAX_ATTEMPTS_PER_DEPLOYMENT": "4",
            "HEADRACE_BREAKER_WINDOW_S": str(BREAKER_WINDOW_S),
            "HEADRACE_BREAKER_MIN_CALLS": "6",
            "HEADRACE_BREAKER_OPEN_S": str(BREAKER_OPEN_S),
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _configure(url: str, **patch: Any) -> None:
    httpx.post(f"{url}/_sim/config", json=patch, timeout=10).raise_for_status()


@pytest.fixture(autouse=True)
def fresh(stack: EmbeddedStack, secondary_url: str) -> Iterator[None]:
    """Healthy providers, clean counters, closed breakers."""
    for url in (stack.simulator_url, secondary_url):
        _configure(url, fault_rate=0.0, faults=["500"], hang_s=30)
        httpx.post(f"{url}/_sim/reset", timeout=10).raise_for_status()
    client = redis_lib.Redis.from_url(stack.env["HEADRACE_REDIS_URL"])
    for key in client.scan_iter("headrace:*breaker*"):
        client.delete(key)
    yield


def _received(*urls: str) -> int:
    return sum(
        sum(httpx.get(f"{u}/_sim/stats", params={"records": 0}).json()["received"].values()) for u in urls
    )


def _results(http: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in http.get(f"/v1/batches/{batch_id}/results").text.splitlines()]


def test_a_fifth_of_calls_failing_loses_nothing_and_every_call_is_costed(
    stack: EmbeddedStack, http: httpx.Client, secondary_url: str
) -> None:
    """20% of calls answer 500 or 529 at random on both providers: 500 requests, every custom_id
    once, all succeeded; one attempt row per provider call; the costs add up."""
    for url in (stack.simulator_url, secondary_url):
        _configure(url, fault_rate=0.2, faults=["500", "529"])
    batch = http.post("/v1/batches", json={"requests": lines(500, "f", ("main",))}).json()["id"]
    view = wait_ended(http, [batch], timeout_s=180)[batch]
    results = _results(http, batch)
    assert sorted(r["custom_id"] for r in results) == sorted(f"f-{i}" for i in range(500))
    assert view["request_counts"]["completed"] == 500 and all(r["status"] == "succeeded" for r in results)
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        ids = select(LlmRequest.id).where(LlmRequest.batch_id == batch)
        attempts = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.request_id.in_(ids))
        )
        failed = session.scalar(
            select(func.count())
            .select_from(Attempt)
            .where(Attempt.request_id.in_(ids), Attempt.outcome != "success")
        )
        cost = session.scalar(select(func.sum(Attempt.cost_usd)).where(Attempt.request_id.in_(ids)))
    assert attempts == _received(stack.simulator_url, secondary_url) and failed > 50
    assert cost == Decimal(view["cost_usd"]) == sum(Decimal(r["cost_usd"]) for r in results)
    assert sum(r["attempts"] for r in results) == attempts


def test_hung_calls_are_cut_at_the_timeout_and_the_batch_completes(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    """A third of the primary's calls hang for 30 s: each is cut at the 1 s call timeout, retried,
    and the batch completes long before any hang would have ended."""
    _configure(stack.simulator_url, fault_rate=0.33, faults=["hang"], hang_s=30)
    started = time.monotonic()
    batch = http.post("/v1/batches", json={"requests": lines(60, "h", ("main",))}).json()["id"]
    view = wait_ended(http, [batch], timeout_s=120)[batch]
    assert view["request_counts"]["completed"] == 60 and time.monotonic() - started < 30
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        ids = select(LlmRequest.id).where(LlmRequest.batch_id == batch)
        cut = list(
            session.scalars(
                select(Attempt.latency_ms).where(Attempt.request_id.in_(ids), Attempt.outcome == "retry")
            )
        )
    assert cut and all(900 <= ms < 2500 for ms in cut), cut


def test_an_outage_of_the_primary_falls_back_then_returns(stack: EmbeddedStack, http: httpx.Client) -> None:
    """The primary answers 503 to everything for 20 s. Within the breaker's window requests go
    straight to the secondary (no attempt on the primary), and after the outage the breaker's
    probes close it and requests return to the primary. Nothing fails."""
    batches: list[tuple[float, str]] = []
    outage: tuple[float, float] = (0.0, 0.0)
    began = time.time()
    while time.time() - began < 35:
        elapsed = time.time() - began
        if outage == (0.0, 0.0) and elapsed >= 5:
            _configure(stack.simulator_url, fault_rate=1.0, faults=["503"])
            outage = (time.time(), 0.0)
        if outage[1] == 0.0 and outage[0] and elapsed >= 25:
            _configure(stack.simulator_url, fault_rate=0.0)
            outage = (outage[0], time.time())
        response = http.post(
            "/v1/batches",
            json={"requests": lines(4, f"o{len(batches)}", ("main",)), "priority": "interactive"},
        )
        batches.append((time.time(), response.json()["id"]))
        time.sleep(0.5)
    wait_ended(http, [b for _, b in batches], timeout_s=120)
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        rows = session.execute(
            select(LlmRequest.id, LlmRequest.status, LlmRequest.deployment, LlmRequest.created_at).where(
                LlmRequest.batch_id.in_([b for _, b in batches])
            )
        ).all()
        tried: dict[str, list[str]] = {}
        for rid, deployment in session.execute(
            select(Attempt.request_id, Attempt.deployment).where(Attempt.request_id.in_([r.id for r in rows]))
        ):
            tried.setdefault(rid, []).append(deployment)
    assert all(r.status == "succeeded" for r in rows)
    start, end = (datetime.fromtimestamp(t, UTC) for t in outage)

    def at(r: Any) -> float:
        return (r.created_at - start).total_seconds()

    first_skip = min(at(r) for r in rows if at(r) > 0 and "primary" not in tried[r.id])
    back = min(at(r) for r in rows if at(r) > (end - start).total_seconds() and tried[r.id] == ["primary"])
    print(
        f"breaker opened {first_skip:.1f}s into the outage; primary answering again "
        f"{back - (end - start).total_seconds():.1f}s after it ended"
    )
    assert first_skip <= BREAKER_WINDOW_S
    during = [r for r in rows if BREAKER_WINDOW_S <= at(r) <= (end - start).total_seconds()]
    assert during and all(r.deployment == "secondary" for r in during)
    skipped = [r for r in during if "primary" not in tried[r.id]]
    assert len(skipped) >= 0.8 * len(during), "with the breaker open, requests skip the primary"
    settled = (end - start).total_seconds() + BREAKER_OPEN_S + 3
    after = [r for r in rows if at(r) >= settled]
    assert after and all(r.deployment == "primary" for r in after)
