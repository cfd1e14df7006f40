"""Four worker processes against each limiter shape the simulator enforces (a token bucket, a
rolling minute, a fixed minute, a fixed minute with 10-second windows): the provider refuses at
most 0.5% of the calls, the first-to-last admission span at the provider is within 10% of what a
clairvoyant client holding exactly the limit would need (``headrace.simulator.ideal``), and every
request completes.

The four shapes run at once, one simulator each (one deployment and route per shape), so the
module costs one shape's time. Each workload ends well inside its last window (the ideal leaves
room in it): a window is a step of 10 or 60 s, and a workload that filled its last window to the
token would turn a call's lateness into a whole step. The batches run at interactive priority:
default and bulk requests leave a share of each limit for interactive ones by design (README,
"Rate limits"); bench/rate_limits.py measures that too."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from headrace.simulator.buckets import Rules
from headrace.simulator.config import SimConfig
from headrace.simulator.ideal import admission_span, ideal_span
from headrace.simulator.server import running_simulator
from headrace.simulator.tokens import count_prompt_tokens
from headrace.stack import EmbeddedStack
from tests.test_end_to_end import wait_ended

# The windows are a minute long: the run takes about 80 s.
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]

RPM, TPM = 600, 160_000
MAX_TOKENS = (256, 512, 768)
# shape: (the simulator's rules, requests); ideal spans 27, 60, 60 and 70 s.
SHAPES = {
    "bucket": (Rules("token-bucket"), 400),
    "rolling": (Rules("rolling"), 400),
    "fixed": (Rules("fixed"), 400),
    "fixed10": (Rules("fixed", 60.0, 10.0), 340),
}

DEPLOYMENT = """
[[deployments]]
name = "{name}"
provider = "openai"
model = "gpt-{name}"
base_url = "{url}/v1"
api_key_env = "{{key_env}}"
rpm = {rpm}
tpm = {tpm}

[[routes]]
name = "{name}"
deployments = ["{name}"]
"""


@pytest.fixture(scope="module")
def simulators() -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as running:
        urls = {}
        for name, (rules, _) in SHAPES.items():
            config = SimConfig(
                latency_ms=40,
                latency_jitter_ms=20,
                rpm=RPM,
                tpm=TPM,
                limiter=rules.shape,
                window_s=rules.window_s,
                sub_window_s=rules.sub_window_s,
                # Every answer runs to its max_tokens: a call uses what it reserved, the ideal is exact.
                min_output_tokens=max(MAX_TOKENS),
                max_output_tokens=max(MAX_TOKENS),
            )
            urls[name] = running.enter_context(running_simulator(config))
        yield urls


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, simulators: dict[str, str]) -> Iterator[EmbeddedStack]:
    config = "".join(
        DEPLOYMENT.format(name=name, url=url, rpm=RPM, tpm=TPM) for name, url in simulators.items()
    )
    stack = EmbeddedStack(
        Path(tmp_path_factory.mktemp("shapes")), config_template=config, workers=4, worker_concurrency=8
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def workload(route: str, n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = ["water", "wheel", "mill", "race", "weir", "sluice", "channel", "flow", "gate", "pond"]
    return [
        {
            "custom_id": f"{route}-{i}",
            "body": {
                "model": route,
                "messages": [
                    {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(10, 100)))}
                ],
                "max_tokens": rng.choice(MAX_TOKENS),
            },
        }
        for i in range(n)
    ]


def test_each_limiter_shape_runs_close_to_its_ideal_with_almost_no_429s(
    stack: EmbeddedStack, simulators: dict[str, str], http: httpx.Client
) -> None:
    lines = {name: workload(name, n) for name, (_, n) in SHAPES.items()}
    batches = {
        name: http.post("/v1/batches", json={"requests": batch, "priority": "interactive"}).json()["id"]
        for name, batch in lines.items()
    }
    views = wait_ended(http, list(batches.values()), timeout_s=400)

    measured = {}
    for name, (rules, _) in SHAPES.items():
        assert views[batches[name]]["request_counts"]["completed"] == len(lines[name]), name
        records = httpx.get(f"{simulators[name]}/_sim/stats", params={"records": 20000}, timeout=30).json()[
            "records"
        ]
        costs = [
            {
                "requests": 1,
                "tokens": count_prompt_tokens(line["body"]["messages"]) + line["body"]["max_tokens"],
            }
            for line in lines[name]
        ]
        ideal = ideal_span(costs, {"requests": RPM, "tokens": TPM}, rules)
        refused = sum(r["status"] == 429 for r in records)
        measured[name] = (admission_span(records), ideal, refused, len(records))
    summary = {
        n: f"span {s:.1f} s, ideal {i:.1f} s, {r} of {c} calls refused"
        for n, (s, i, r, c) in measured.items()
    }
    for span, ideal, refused, calls in measured.values():
        assert refused <= 0.005 * calls, summary
        assert ideal > 10 and span <= 1.1 * ideal, summary
