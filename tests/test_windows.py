"""A batch uses its window: a 60 s outage of a route's only deployment in the middle of a
1,000-request batch ends with every request succeeded, and the calls made during the outage stay
bounded (the breaker's probes and the requests already in flight, not a storm); a route with a
5 s deadline under the same outage ends its requests ``expired`` within the deadline, with each
deployment's last error."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from headrace.stack import EmbeddedStack
from tests.test_end_to_end import lines, wait_ended

pytestmark = pytest.mark.slow
OUTAGE_S = 60
BREAKER_OPEN_S = 2  # the default
BREAKER_PROBES = 2
WORKERS, THREADS, ATTEMPTS_PER_DEPLOYMENT = 2, 8, 3

CONFIG = """
[[deployments]]
name = "solo"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{key_env}"
rpm = 100000
tpm = 100000000

[[routes]]
name = "only"
deployments = ["solo"]

[[routes]]
name = "hurried"
deployments = ["solo"]
deadline_s = 5
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("windows"),
        config_template=CONFIG,
        workers=WORKERS,
        worker_concurrency=THREADS,
        simulator_args=("--latency-ms", "100"),
        extra_env={
            "HEADRACE_BREAKER_OPEN_S": str(BREAKER_OPEN_S),
            "HEADRACE_BREAKER_PROBES": str(BREAKER_PROBES),
            "HEADRACE_MAX_ATTEMPTS_PER_DEPLOYMENT": str(ATTEMPTS_PER_DEPLOYMENT),
            "HEADRACE_BACKOFF_MAX_S": "1",
            "HEADRACE_PARK_MAX_S": "20",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _sim(stack: EmbeddedStack, **config: Any) -> None:
    httpx.post(f"{stack.simulator_url}/_sim/config", json=config, timeout=10).raise_for_status()


def _calls(stack: EmbeddedStack) -> int:
    stats = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 0}, timeout=10).json()
    return int(sum(stats["received"].values()))


def _results(http: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in http.get(f"/v1/batches/{batch_id}/results").text.splitlines()]


def test_a_minute_long_outage_of_the_only_deployment_loses_nothing_and_storms_nothing(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    """1,000 requests; 2 s in, every call answers 503 for 60 s. Every request succeeds after the
    outage, and the provider sees at most what was in flight when it began (every slot's tries on
    its deployment) plus the breaker's probes, once per open period: not a storm."""
    httpx.post(f"{stack.simulator_url}/_sim/reset", timeout=10).raise_for_status()
    batch = http.post("/v1/batches", json={"requests": lines(1000, "w", ("only",))}).json()["id"]
    time.sleep(2)
    _sim(stack, fault_rate=1.0, faults=["503"])
    began, calls_before = time.monotonic(), _calls(stack)
    # Live traffic: interactive priority, so it does not queue behind the batch.
    live = {"requests": lines(20, "h", ("hurried",)), "priority": "interactive"}
    hurried = http.post("/v1/batches", json=live).json()["id"]
    hurried_view = wait_ended(http, [hurried], timeout_s=30)[hurried]
    hurried_s = time.monotonic() - began
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - began)))
    calls_during = _calls(stack) - calls_before
    _sim(stack, fault_rate=0.0)
    recovered = time.monotonic()
    view = wait_ended(http, [batch], timeout_s=300)[batch]
    after_s = time.monotonic() - recovered
    results = _results(http, batch)
    assert view["status"] == "completed" and view["request_counts"]["completed"] == 1000
    assert sorted(r["custom_id"] for r in results) == sorted(f"w-{i}" for i in range(1000))
    bound = WORKERS * THREADS * ATTEMPTS_PER_DEPLOYMENT + BREAKER_PROBES * (OUTAGE_S // BREAKER_OPEN_S + 1)
    print(f"\n{calls_during} calls during the {OUTAGE_S} s outage (bound {bound})")
    print(f"the batch ended {after_s:.0f} s after the outage")
    print(f"the 20 requests with a 5 s deadline ended in {hurried_s:.1f} s")
    assert calls_during <= bound

    # The route with a 5 s deadline: its requests ended expired within it, each with the last
    # error of its deployment, none failed for a fault that was not its own.
    hurried_results = _results(http, hurried)
    # Within the deadline, give or take the one inline backoff (1 s here) it may be sleeping.
    assert hurried_view["request_counts"]["expired"] == 20 and hurried_s < 5 + 2
    for result in hurried_results:
        assert result["status"] == "expired", result
        (last,) = result["error"]["deployments"]
        assert last["deployment"] == "solo" and (last.get("status") == 503 or last["kind"] == "circuit_open")
