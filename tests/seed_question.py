"""The seed question: "if consumption doubled tomorrow, would the system react without interrupting
service?", asked of the real stack (PostgreSQL, Redis, four worker processes, the simulator
enforcing a token limit) by tests/test_budget_runs.py, which shares its stack with the other budget
runs (one stack start instead of two, and none left idle between tests).

A steady workload runs on route ``smart`` under a budget whose first step downgrades it to
``fast``; halfway, its prompts double. Throttling engages (requests wait for the deployment's token
room, the provider's 429s stay at about zero), the budget's first ladder step fires (later
requests run on ``fast``, and their result lines say so), the anomaly detector records a
``tokens_per_request`` event, and no request fails.
"""

from __future__ import annotations

import math
import statistics
import time
from decimal import Decimal

import httpx
import redis as redis_lib
from sqlalchemy import select

from broker_config.budget_state import budgets_changed
from db.budgets import set_budget
from db.engine import get_database
from db.models import Attempt, LlmRequest
from db.tenants import create_api_key
from headrace.simulator.tokens import count_prompt_tokens
from headrace.stack import EmbeddedStack
from tests.test_end_to_end import wait_ended
from tests.test_outages import _results, _sim, _sim_stats

TPM = 60_000  # the provider's token limit on route smart's deployment (and the simulator's)
OUTPUT = 40
IN_PRICE, OUT_PRICE = Decimal(10), Decimal(30)
PER_SECOND = 2
STEADY_S = 8
DOUBLED_S = 12  # long enough that throttling engages first and the ladder's step while it lasts

# Route smart's deployment (OpenAI dialect: the simulator enforces TPM on it) and the cheaper one
# the budget's first step sends it to (Anthropic dialect: limits of its own).
CONFIG = f"""\
[[deployments]]
name = "big"
provider = "openai"
model = "gpt-4o"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = 10000
tpm = {TPM}
input_price_per_mtok = {IN_PRICE}
output_price_per_mtok = {OUT_PRICE}

[[deployments]]
name = "small"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{{sim}}"
api_key_env = "{{key_env}}"
rpm = 10000
itpm = 2000000
otpm = 400000
input_price_per_mtok = 1
output_price_per_mtok = 5

[[routes]]
name = "smart"
deployments = ["big"]

[[routes]]
name = "fast"
deployments = ["small"]
"""
SIMULATOR_ARGS = ("--tpm", str(TPM))
ENV = {
    "HEADRACE_ANOMALY_INTERVAL_S": "2",
    "HEADRACE_ANOMALY_MIN_INTERVALS": "3",
    "HEADRACE_ANOMALY_FACTOR": "1.5",
    "HEADRACE_ANOMALY_MIN_REQUESTS": "2",
    "HEADRACE_ANOMALY_MIN_TOKENS_PER_REQUEST": "100",
    "HEADRACE_ANOMALY_MIN_SPEND_USD": "0.001",
}


def _body(words: int) -> dict[str, object]:
    return {
        "model": "smart",
        "messages": [{"role": "user", "content": "word " * words}],
        "max_tokens": OUTPUT,
    }


def _cost(body: dict[str, object]) -> Decimal:
    """What the call will cost: its prompt as the simulator counts it, and its whole output."""
    prompt = count_prompt_tokens(body["messages"])  # type: ignore[arg-type]
    return (prompt * IN_PRICE + OUTPUT * OUT_PRICE) / 1_000_000


def ask_the_seed_question(stack: EmbeddedStack) -> None:
    """Prompts double halfway: throttling, the ladder's first step and an anomaly react, and no
    request fails."""
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    key = create_api_key(db, "seed").key
    admin = create_api_key(db, "ops", admin=True).key
    # Steady: 2 requests a second of ~430 tokens each (prompt and output), ~85% of the deployment's
    # refill of 1,000 tokens a second; doubled: ~1,620 a second.
    steady, doubled, warm = _body(380), _body(760), _body(3600)
    # The warm-up (another feature, so that it is no part of search's baseline) empties the token
    # bucket first, so that the doubled phase soon finds no room left.
    per_warmup = count_prompt_tokens(warm["messages"]) + OUTPUT  # type: ignore[arg-type]
    warmups = math.ceil(TPM * 1.05 / per_warmup)
    before = warmups * _cost(warm) + STEADY_S * PER_SECOND * _cost(steady)
    # The first step is met about half way into the doubled phase's spend, after throttling has
    # engaged and while its requests still arrive: the ladder applies from a request's next run
    # on, so a step met only after the last had arrived (70% in, 8 s long) was seen by none of
    # them unless one happened to park; met 30% in (8 s), too few had waited for room yet.
    limit = (before + Decimal("0.5") * DOUBLED_S * PER_SECOND * _cost(doubled)) / Decimal("0.8")
    set_budget(db, "seed", "daily", limit_usd=limit, period="day", ladder="downgrade@0.8:smart>fast,refuse@1")
    budgets_changed(redis_lib.Redis.from_url(stack.env["HEADRACE_REDIS_URL"]))
    _sim(stack, latency_ms=300, fault_rate=0.0, min_output_tokens=OUTPUT, max_output_tokens=OUTPUT)

    batches: dict[str, str] = {}  # batch id -> phase
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:

        def submit(phase: str, body: dict[str, object], n: int, feature: str = "search") -> None:
            lines = [{"custom_id": f"{phase}-{len(batches)}-{i}", "body": body} for i in range(n)]
            payload = {"requests": lines, "priority": "interactive", "metadata": {"feature": feature}}
            created = http.post("/v1/batches", json=payload)
            assert created.status_code == 201, created.text
            batches[created.json()["id"]] = phase

        submit("warmup", warm, warmups, feature="warmup")
        wait_ended(http, list(batches), timeout_s=60)
        for phase, body, phase_s in (("steady", steady, STEADY_S), ("doubled", doubled, DOUBLED_S)):
            started = time.monotonic()
            for tick in range(phase_s):
                submit(phase, body, PER_SECOND)
                time.sleep(max(0.0, started + tick + 1 - time.monotonic()))
        wait_ended(http, list(batches), timeout_s=180)
        results = {b: _results(http, b) for b in batches}
        deadline = time.monotonic() + 30
        while True:  # the detector judges an interval once it has passed
            events = http.get("/v1/events").json()["data"]
            if any(e["kind"] == "tokens_per_request" for e in events) or time.monotonic() > deadline:
                break
            time.sleep(1)
        seen_by_admin = httpx.get(
            f"{stack.api_url}/v1/events", headers={"Authorization": f"Bearer {admin}"}, timeout=30
        ).json()["data"]

    # No request fails.
    lines = [(batches[b], line) for b, found in results.items() for line in found]
    assert [line["status"] for _, line in lines] == ["succeeded"] * len(lines)

    # Throttling engaged: the doubled phase's requests on smart waited for token room...
    waits = _waits(stack, [b for b, phase in batches.items() if phase != "warmup"])
    steady_waits = [w for phase, route, w in waits if phase == "steady"]
    throttled = [w for phase, route, w in waits if phase == "doubled" and route == "big"]
    print(
        f"\nwaits for a first call: steady p50 {statistics.median(steady_waits):.2f} s max "
        f"{max(steady_waits):.2f} s; doubled on smart p50 {statistics.median(throttled):.2f} s max "
        f"{max(throttled):.2f} s"
    )
    assert max(throttled) > 1.0 and max(throttled) > 2 * max(steady_waits)
    # ...and the provider's limit was not tripped for it.
    stats = _sim_stats(stack)
    refused = sum(int(codes.get("429", 0)) for codes in stats["answered"].values())
    answered = sum(sum(int(n) for n in codes.values()) for codes in stats["answered"].values())
    assert refused <= max(1, answered // 200), (refused, answered)

    # The budget's first step fired in the doubled phase: later requests ran on fast, and say so.
    downgraded = [line for phase, line in lines if line.get("downgraded_from") == "smart"]
    assert downgraded and all(
        line["route"] == "fast" and line["downgraded_by"] == "daily" for line in downgraded
    )
    assert all(phase == "doubled" for phase, line in lines if line.get("downgraded_from"))
    assert all(line["deployment"] == "small" for line in downgraded)

    # The anomaly detector saw tokens per request jump, for the tenant and its operator.
    jumps = [
        e for e in events if e["kind"] == "tokens_per_request" and e["subject"].get("feature") == "search"
    ]
    assert len(jumps) == 1, events
    assert jumps[0]["detail"]["observed"] > 1.5 * jumps[0]["detail"]["baseline"]
    assert any(e["id"] == jumps[0]["id"] for e in seen_by_admin)


def _waits(stack: EmbeddedStack, batch_ids: list[str]) -> list[tuple[str, str, float]]:
    """(phase, deployment, seconds from accept to its first call) per request."""
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    with db.session() as session:
        rows = session.execute(
            select(LlmRequest.custom_id, LlmRequest.created_at, Attempt.deployment, Attempt.started_at)
            .join(Attempt, Attempt.request_id == LlmRequest.id)
            .where(LlmRequest.batch_id.in_(batch_ids), Attempt.attempt_no == 1)
        ).all()
    return [
        (custom_id.split("-")[0], deployment, (started - created).total_seconds())
        for custom_id, created, deployment, started in rows
    ]
