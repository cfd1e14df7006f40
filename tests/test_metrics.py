"""What Prometheus would scrape: the API's /metrics and every worker's own, after a real run with
faults, checked against the ledger and against what the simulator did."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
import redis as redis_lib
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from broker_config.celery_app import configure
from broker_config.metrics import LabelCap, Spend
from broker_config.publisher import publish_requests
from broker_config.queue_state import read_queues
from broker_config.settings import Settings
from db.engine import get_database
from db.models import Attempt, Batch, LlmRequest
from headrace.embedded import ManagedProcess, free_port, headrace_command
from headrace.stack import EmbeddedStack
from tests.test_end_to_end import wait_ended

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for labels, v in samples.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def merged(scrapes: list[Samples]) -> Samples:
    out: Samples = defaultdict(list)
    for samples in scrapes:
        for name, values in samples.items():
            out[name].extend(values)
    return out


def test_a_label_keeps_its_first_values_and_calls_the_rest_other() -> None:
    cap = LabelCap(2)
    assert [cap("a"), cap("b"), cap("c"), cap("a"), cap(None)] == ["a", "b", "other", "a", "other"]


def test_spend_counters_label_the_chosen_tags_only() -> None:
    registry = CollectorRegistry()
    spend = Spend(("feature", "team-name"), label_values=5, registry=registry)
    spend.record(
        tenant="acme",
        route="fast",
        deployment="d1",
        tags={"feature": "search", "team-name": "core", "user": "u1"},
        input_tokens=10,
        output_tokens=3,
        cached_input_tokens=4,
        cost_usd=0.5,
    )
    labels = {"tenant": "acme", "route": "fast", "deployment": "d1", "feature": "search", "team_name": "core"}
    assert registry.get_sample_value("headrace_tokens_total", {**labels, "token_type": "input"}) == 10
    assert registry.get_sample_value("headrace_tokens_total", {**labels, "token_type": "cached_input"}) == 4
    assert registry.get_sample_value("headrace_cost_usd_total", labels) == 0.5
    assert "user" not in spend.tokens._labelnames  # only the chosen keys are labels


def test_a_tag_key_that_would_shadow_a_label_is_refused() -> None:
    with pytest.raises(ValueError, match="shadow"):
        Settings(metric_tag_keys="feature,tenant")


def test_queue_depth_and_the_age_of_the_oldest_message_per_priority(
    redis: redis_lib.Redis, redis_url: str
) -> None:
    configure(Settings(redis_url=redis_url))
    publish_requests([("r1", "bulk"), ("r2", "bulk"), ("r3", "interactive")])
    states = {q.priority: q for q in read_queues(redis)}
    later = {q.priority: q for q in read_queues(redis, now=time.time() + 3600)}
    assert {p: s.depth for p, s in states.items()} == {"interactive": 1, "default": 0, "bulk": 2}
    assert 0 <= states["bulk"].oldest_age_s < 60
    assert states["default"].oldest_age_s == 0
    assert 3600 <= later["bulk"].oldest_age_s < 3660, "the age is counted from the message's publish time"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("metrics-stack"),
        workers=2,
        worker_concurrency=8,
        # Weather: 6% of calls fail, with a 5xx or a 429 no header foretold (a provider at
        # capacity); the OpenAI dialect allows fewer requests per minute than the deployments
        # file says, which the bucket learns from the provider's headers.
        simulator_args=(
            "--latency-ms",
            "10",
            "--latency-jitter-ms",
            "5",
            "--fault-rate",
            "0.06",
            "--faults",
            "429,500,503,529",
            "--rpm",
            "240",
            "--seed",
            "11",
        ),
        extra_env={
            "HEADRACE_BACKOFF_BASE_S": "0.05",
            "HEADRACE_BACKOFF_MAX_S": "0.2",
            "HEADRACE_BREAKER_CONSECUTIVE_FAILURES": "5",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _lines(n: int, prefix: str, route: str, text: str = "") -> list[dict[str, object]]:
    return [
        {
            "custom_id": f"{prefix}-{i}",
            "body": {
                "model": route,
                "messages": [{"role": "user", "content": f"{text}Question {i}: " + "why? " * (i % 11)}],
                "max_tokens": 8 + i % 24,
            },
        }
        for i in range(n)
    ]


@pytest.mark.slow
def test_counters_equal_the_ledger_and_what_the_simulator_did(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    batches = [
        ({"feature": "search"}, "interactive", _lines(140, "s", "fast")),
        ({"feature": "chat"}, "bulk", _lines(140, "c", "smart")),
        # Every call of these fails with a 500: both deployments of "smart" trip their breakers.
        ({"feature": "broken"}, "default", _lines(20, "x", "smart", "[[sim:status=500]] ")),
    ]
    batch_ids = []
    for metadata, priority, lines in batches:
        body = {"requests": lines, "priority": priority, "metadata": metadata}
        response = http.post("/v1/batches", json=body)
        assert response.status_code == 201, response.text
        batch_ids.append(response.json()["id"])
    wait_ended(http, batch_ids, timeout_s=300)

    workers = [scrape(url) for url in stack.worker_metrics_urls.values()]
    assert len(workers) == 2 and all(workers)
    pool = merged(workers)
    api = scrape(f"{stack.api_url}/metrics")
    sim = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 0}).json()
    deployments = http.get("/v1/deployments").json()

    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    with db.session() as session:
        tokens_in, tokens_out, cost = session.execute(
            select(
                func.sum(Attempt.input_tokens), func.sum(Attempt.output_tokens), func.sum(Attempt.cost_usd)
            )
        ).one()
        by_feature = {
            feature: Decimal(c or 0)
            for feature, c in session.execute(
                select(Batch.metadata_["feature"].as_string(), func.sum(Attempt.cost_usd))
                .join(LlmRequest, LlmRequest.batch_id == Batch.id)
                .join(Attempt, Attempt.request_id == LlmRequest.id)
                .group_by(Batch.metadata_["feature"].as_string())
            )
        }
        outcomes = Counter(
            dict(session.execute(select(Attempt.outcome, func.count()).group_by(Attempt.outcome)).all())
        )
        statuses = Counter(
            dict(session.execute(select(LlmRequest.status, func.count()).group_by(LlmRequest.status)).all())
        )
        rate_limited = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.http_status == 429)
        )

    # Tokens and cost: the counters are the ledger's sums, per tag too.
    assert total(pool, "headrace_tokens_total", token_type="input") == tokens_in
    assert total(pool, "headrace_tokens_total", token_type="output") == tokens_out
    assert total(pool, "headrace_cost_usd_total") == pytest.approx(float(cost), abs=1e-9)
    for feature, feature_cost in by_feature.items():
        assert total(pool, "headrace_cost_usd_total", feature=feature) == pytest.approx(
            float(feature_cost), abs=1e-9
        )
    # The GenAI conventions' histograms saw every call, and every answered call's tokens.
    assert total(pool, "gen_ai_client_operation_duration_seconds_count") == sum(outcomes.values())
    answered_input = total(pool, "gen_ai_client_token_usage_sum", gen_ai_token_type="input")
    assert answered_input <= tokens_in and answered_input > 0

    # What the simulator did: its 429s, one by one; its 500s opened breakers.
    sim_429 = sum(int(codes.get("429", 0)) for codes in sim["answered"].values())
    assert sim_429 > 0, "the run should have met some 429s"
    assert total(pool, "headrace_provider_rate_limited_total") == sim_429 == rate_limited
    opened = sum(d["breaker_opened"] for d in deployments["data"])
    assert opened >= 1
    assert total(pool, "headrace_breaker_transitions_total", transition="opened") == opened
    for route, counts in deployments["fallbacks"].items():
        for to, n in counts.items():
            assert total(pool, "headrace_fallbacks_total", route=route, to_deployment=to) == n

    # Every attempt and every request end, by outcome and status.
    for outcome, n in outcomes.items():
        assert total(pool, "headrace_attempts_total", outcome=outcome) == n, outcome
    for status, n in statuses.items():
        assert total(pool, "headrace_requests_ended_total", status=status) == n, status
    assert total(pool, "headrace_requests_ended_total", status="failed") >= 20

    # The API: what it accepted, and the pool's shared state now that every queue is empty.
    assert total(api, "headrace_requests_accepted_total") == 300
    assert total(api, "headrace_batches_accepted_total", api="native") == 3
    assert total(api, "headrace_state_redis_up") == 1
    assert {labels["priority"] for labels, _ in api["headrace_queue_depth"]} == {
        "interactive",
        "default",
        "bulk",
    }
    assert total(api, "headrace_queue_depth") == 0
    assert {labels["kind"] for labels, _ in api["headrace_bucket_capacity"]} >= {"configured", "effective"}
    assert total(api, "headrace_breaker_state", deployment="openai-mini") in (0, 1, 2)


@pytest.mark.slow
def test_queues_endpoint_and_top_show_the_pool(
    stack: EmbeddedStack, http: httpx.Client, run_cli: Callable[..., str]
) -> None:
    queues = http.get("/v1/queues").json()
    assert [q["priority"] for q in queues["data"]] == ["interactive", "default", "bulk"]
    assert all(q["depth"] >= 0 and q["oldest_age_s"] >= 0 for q in queues["data"])
    assert http.get("/v1/queues", headers={"Authorization": "Bearer nope"}).status_code == 401
    deployments = http.get("/v1/deployments").json()["data"]
    assert all(
        set(d["last_minute"]) == {"calls", "input_tokens", "output_tokens", "cost_usd"} for d in deployments
    )

    env = {"HEADRACE_API_URL": stack.api_url, "HEADRACE_API_KEY": stack.api_key, "COLUMNS": "220"}
    frame = run_cli("top", "--once", env=env)
    for text in (
        "Queues",
        "interactive",
        "bulk",
        "parked",
        "Deployments",
        "openai-mini",
        "claude-sonnet",
        "output_tokens",
    ):
        assert text in frame, f"{text!r} not in:\n{frame}"


@pytest.mark.slow
def test_several_api_processes_serve_their_counters_summed(stack: EmbeddedStack, tmp_path: Path) -> None:
    """``headrace api --workers 2``: whichever process answers a scrape, it counts every process's
    accepted batches (prometheus_client's multiprocess mode)."""
    port = free_port()
    api = ManagedProcess(
        "api-2",
        headrace_command("api", "--port", str(port), "--workers", "2"),
        log_dir=tmp_path,
        env={**os.environ, **stack.env},
    )
    try:
        api.wait_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60)
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=30) as client:
            for i in range(6):  # new connections: uvicorn's processes share the listening socket
                body = {"requests": _lines(2, f"mp{i}", "fast")}
                response = client.post("/v1/batches", json=body, headers={"Connection": "close"})
                assert response.status_code == 201, response.text
            seen = {
                total(scrape(f"http://127.0.0.1:{port}/metrics"), "headrace_requests_accepted_total")
                for _ in range(6)
            }
    finally:
        api.stop()
    assert seen == {12.0}


@pytest.mark.slow
def test_the_usage_command_reports_what_the_ledger_holds(
    stack: EmbeddedStack, http: httpx.Client, run_cli: Callable[..., str]
) -> None:
    every = [b["id"] for b in http.get("/v1/batches", params={"limit": 100}).json()["data"]]
    wait_ended(http, every, timeout_s=120)  # the batches of the tests before: nothing in flight
    env = {"HEADRACE_API_URL": stack.api_url, "HEADRACE_API_KEY": stack.api_key}
    report = json.loads(
        run_cli("usage", "--group-by", "feature,route", "--since", "1h", "--format", "json", env=env)
    )
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        cost = session.scalar(select(func.coalesce(func.sum(Attempt.cost_usd), 0)))
        requests = session.scalar(select(func.count()).select_from(LlmRequest))
    assert Decimal(report["total"]["cost_usd"]) == cost
    assert report["total"]["requests"] == requests
    assert sum(Decimal(g["cost_usd"]) for g in report["data"]) == cost
    table = run_cli("usage", "--group-by", "feature", "--since", "1h", env={**env, "COLUMNS": "200"})
    assert "total" in table and "overhead USD" in table
