"""Four worker processes share each provider's limits through Redis: the simulator, which enforces
the limits the way the providers do, almost never has to refuse, and nothing is lost."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from headrace.stack import EmbeddedStack
from tests.test_end_to_end import wait_ended

# A four-worker stack run for over a minute against limits that bind.
pytestmark = pytest.mark.slow

SIM_RPM, SIM_TPM = 600, 6000  # OpenAI dialect, per model
SIM_ANTHROPIC_RPM, SIM_ITPM, SIM_OTPM = 120, 20000, 8000

CONFIG = f"""
[[deployments]]
name = "openai-mini"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = {SIM_RPM}
tpm = {SIM_TPM}

[[deployments]]
name = "claude-haiku"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{{sim}}"
api_key_env = "{{key_env}}"
rpm = {SIM_ANTHROPIC_RPM}
itpm = {SIM_ITPM}
otpm = {SIM_OTPM}

# Configured at twice what the provider really allows: the pool must find the real limit.
[[deployments]]
name = "openai-4o"
provider = "openai"
model = "gpt-4o"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = {SIM_RPM}
tpm = {2 * SIM_TPM}

[[routes]]
name = "openai"
deployments = ["openai-mini"]

[[routes]]
name = "claude"
deployments = ["claude-haiku"]

[[routes]]
name = "double"
deployments = ["openai-4o"]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("limits"),
        config_template=CONFIG,
        workers=4,
        worker_concurrency=4,
        simulator_args=(
            "--latency-ms",
            "30",
            "--latency-jitter-ms",
            "10",
            "--rpm",
            str(SIM_RPM),
            "--tpm",
            str(SIM_TPM),
            "--anthropic-rpm",
            str(SIM_ANTHROPIC_RPM),
            "--itpm",
            str(SIM_ITPM),
            "--otpm",
            str(SIM_OTPM),
            "--max-output-tokens",
            "60",
        ),
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def workload(n: int, route: str, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["water", "wheel", "mill", "race", "weir", "sluice", "channel", "flow", "gate", "pond", "stream"]
    return [
        {
            "custom_id": f"{route}-{i}",
            "body": {
                "model": route,
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 60)))}
                ],
                "max_tokens": rng.randint(40, 120),
            },
        }
        for i in range(n)
    ]


def sim_calls(stack: EmbeddedStack) -> list[dict[str, Any]]:
    stats = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 20000}, timeout=30).json()
    return list(stats["records"])


def max_in_window(times_amounts: list[tuple[float, float]], window_s: float) -> float:
    ordered = sorted(times_amounts)
    best, total, start = 0.0, 0.0, 0
    for t, amount in ordered:
        total += amount
        while ordered[start][0] < t - window_s:
            total -= ordered[start][1]
            start += 1
        best = max(best, total)
    return best


def test_four_workers_stay_within_the_providers_limits(stack: EmbeddedStack, http: httpx.Client) -> None:
    """OpenAI TPM and Anthropic RPM are the binding limits. Headrace sends no more than a provider's
    bucket allows in any 10 s window, 429s are under 1% of calls, and every request completes."""
    batches = [
        http.post("/v1/batches", json={"requests": workload(100, "openai", 1), "priority": "bulk"}).json()[
            "id"
        ],
        http.post("/v1/batches", json={"requests": workload(150, "claude", 2)}).json()["id"],
    ]
    views = wait_ended(http, batches, timeout_s=240)
    assert all(v["request_counts"]["completed"] == v["request_counts"]["total"] for v in views.values())
    calls = [c for c in sim_calls(stack) if c["model"] in ("gpt-4o-mini", "claude-3-5-haiku-latest")]
    refused = sum(c["status"] == 429 for c in calls)
    assert refused <= 0.01 * len(calls), f"{refused} of {len(calls)} calls refused"

    window = 10.0
    openai = [
        (c["t"], c["input_tokens"] + c["output_tokens"])
        for c in calls
        if c["model"] == "gpt-4o-mini" and c["admitted"]
    ]
    assert max_in_window(openai, window) <= SIM_TPM + SIM_TPM * window / 60
    claude_sent = [(c["t"], 1.0) for c in calls if c["model"] == "claude-3-5-haiku-latest"]
    assert max_in_window(claude_sent, window) <= SIM_ANTHROPIC_RPM + SIM_ANTHROPIC_RPM * window / 60 + 1
    # And the limits were really binding: the pool went past the first minute's bucket.
    assert sum(a for _, a in openai) > SIM_TPM and len(claude_sent) > SIM_ANTHROPIC_RPM


def test_a_configured_limit_above_the_real_one_converges_without_losing_requests(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    """openai-4o is configured at twice the simulator's TPM: the bucket learns the real limit from
    the provider's headers, every request completes, and the 429s that slipped through are few."""
    batch = http.post("/v1/batches", json={"requests": workload(100, "double", 3)}).json()["id"]
    view = wait_ended(http, [batch], timeout_s=240)[batch]
    assert view["request_counts"]["completed"] == 100
    deployments = {d["name"]: d for d in http.get("/v1/deployments").json()["data"]}
    tokens = next(limit for limit in deployments["openai-4o"]["limits"] if limit["name"] == "tokens")
    assert tokens["configured"] == 2 * SIM_TPM and tokens["learned"] == SIM_TPM
    calls = [c for c in sim_calls(stack) if c["model"] == "gpt-4o"]
    refused = sum(c["status"] == 429 for c in calls)
    assert refused == deployments["openai-4o"]["rate_limited"]
    assert refused <= 0.05 * len(calls), f"{refused} of {len(calls)} calls refused"


def test_status_shows_every_deployments_bucket(stack: EmbeddedStack, run_cli: Callable[..., str]) -> None:
    """`headrace status --deployments`: a row per limit, the learned limit beside the configured one."""
    env = {"HEADRACE_API_URL": stack.api_url, "HEADRACE_API_KEY": stack.api_key, "COLUMNS": "200"}
    table = run_cli("status", "--deployments", env=env)
    for name in ("openai-mini", "claude-haiku", "openai-4o", "input_tokens", "output_tokens"):
        assert name in table
    assert f"{2 * SIM_TPM:,} (provider: {SIM_TPM})" in table
    assert "continuous" in table  # the simulator's default limiter is a token bucket
