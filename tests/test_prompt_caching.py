"""Provider prompt caching, priced right: cache reads and writes priced at genai-prices' own cache
rates (or a deployment's), recorded on attempt and request rows; cache_control and thinking carried
to Anthropic deployments and never sent to OpenAI ones (the simulator answers such a field 400, as
OpenAI does), which a result line then notes; the simulator's prompt cache as each provider's."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import genai_prices
import httpx
import pytest
import redis as redis_lib
from pydantic import ValidationError
from sqlalchemy import select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch, result_line
from broker_config.deployments import Deployment
from db.engine import Database
from db.models import Attempt, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from headrace.embedded import free_port
from headrace.simulator.anthropic_dialect import signature
from headrace.simulator.prompt_cache import CachePoint, PromptCache
from headrace.simulator.tokens import count_prompt_tokens
from tests.pipeline_deps import pipeline_deps
from tests.simulator_fixture import SimControl
from workers.costing import call_cost_usd
from workers.pipeline import Deps, run_request
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.anthropic_parts import anthropic_parts, without_anthropic_parts
from workers.providers.anthropic_translate import chat_to_messages
from workers.providers.base import CallFailed, ProviderCall, ProviderReply, Usage, call_provider
from workers.providers.openai import OpenAIAdapter

KEY_ENV = "HEADRACE_TEST_SIM_KEY"
EPHEMERAL = {"type": "ephemeral"}
SYSTEM = "You answer questions about mill races, sluices and water wheels, briefly. " * 8
THINKING = {"type": "enabled", "budget_tokens": 1024}
MTOK = Decimal(1_000_000)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _deployment(provider: str, base: str, model: str | None = None, **extra: Any) -> Deployment:
    default = "gpt-4o-mini" if provider == "openai" else "claude-3-5-haiku-latest"
    return Deployment(
        name=f"{provider}-d",
        provider=provider,  # type: ignore[arg-type]
        model=model or default,
        base_url=f"{base}/v1" if provider == "openai" else base,
        api_key_env=KEY_ENV,
        **extra,
    )


def _cached_body(question: str = "How fast does the wheel turn?", **extra: Any) -> dict[str, Any]:
    system = {"role": "system", "content": [{"type": "text", "text": SYSTEM, "cache_control": EPHEMERAL}]}
    return {"model": "r", "messages": [system, {"role": "user", "content": question}], **extra}


def _call(deployment: Deployment, body: dict[str, Any]) -> ProviderReply:
    call = ProviderCall(
        deployment=deployment, body=body, timeout_s=5.0, connect_timeout_s=1.0, default_max_tokens=64
    )
    reply = call_provider(OpenAIAdapter() if deployment.provider == "openai" else AnthropicAdapter(), call)
    assert isinstance(reply, ProviderReply), reply
    return reply


def _genai_cost(model: str, provider: str, usage: Usage) -> Decimal:
    """The price from genai-prices' own rates for the model, figured by hand."""
    rates = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=1, output_tokens=1), model_ref=model, provider_id=provider
    ).model_price
    uncached = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
    read, write = rates.cache_read_mtok, rates.cache_write_mtok or rates.input_mtok
    assert isinstance(rates.input_mtok, Decimal) and isinstance(read, Decimal) and isinstance(write, Decimal)
    assert isinstance(rates.output_mtok, Decimal)
    return (
        uncached * rates.input_mtok
        + usage.cache_read_tokens * read
        + usage.cache_write_tokens * write
        + usage.output_tokens * rates.output_mtok
    ) / MTOK


# --- prices --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "provider"),
    [("claude-3-5-haiku-latest", "anthropic"), ("claude-sonnet-4-0", "anthropic"), ("gpt-4o-mini", "openai")],
)
def test_cache_reads_are_priced_at_the_providers_cache_rate(model: str, provider: str) -> None:
    """2,000 prompt tokens of which 1,500 read from the cache cost genai-prices' cache-read rate for
    those, exactly, and less than the same call uncached."""
    deployment = Deployment(name="d", provider=provider, model=model)  # type: ignore[arg-type]
    cached, plain = Usage(2000, 100, cache_read_tokens=1500), Usage(2000, 100)
    assert call_cost_usd(deployment, cached) == _genai_cost(model, provider, cached)
    assert call_cost_usd(deployment, plain) == _genai_cost(model, provider, plain)
    assert call_cost_usd(deployment, cached) < call_cost_usd(deployment, plain)  # type: ignore[operator]
    written = Usage(2000, 100, cache_write_tokens=1500)
    assert call_cost_usd(deployment, written) == _genai_cost(model, provider, written)


def test_claude_haiku_figures() -> None:
    """The figures, for the record: $0.80/MTok input, $0.08 cache read, $1 cache write, $4 output."""
    deployment = Deployment(name="d", provider="anthropic", model="claude-3-5-haiku-latest")
    assert call_cost_usd(deployment, Usage(2000, 100, cache_read_tokens=1500)) == Decimal("0.00092")
    assert call_cost_usd(deployment, Usage(2000, 100)) == Decimal("0.00200")
    assert call_cost_usd(deployment, Usage(2000, 100, cache_write_tokens=1500)) == Decimal("0.00230")


def test_a_price_override_prices_cache_traffic_at_its_own_rates_or_else_at_input() -> None:
    usage = Usage(1_000_000, 1_000_000, cache_read_tokens=400_000, cache_write_tokens=100_000)
    plain = Deployment(
        name="d", provider="openai", model="m", input_price_per_mtok=2, output_price_per_mtok=8
    )
    assert call_cost_usd(plain, usage) == Decimal(2 + 8)  # no discount assumed
    priced = plain.model_copy(update={"cache_read_price_per_mtok": 1, "cache_write_price_per_mtok": 3})
    assert call_cost_usd(priced, usage) == Decimal("0.5") * 2 + Decimal("0.4") * 1 + Decimal("0.1") * 3 + 8
    with pytest.raises(ValidationError, match="cache prices need"):
        Deployment(name="d", provider="openai", model="m", cache_read_price_per_mtok=1)


# --- the canonical body's Anthropic-only parts ----------------------------------------------------


def _full_body() -> dict[str, Any]:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    blocks = [
        {"type": "thinking", "thinking": "t", "signature": "s"},
        {"type": "redacted_thinking", "data": "d"},
    ]
    return {
        "model": "r",
        "max_tokens": 2000,
        "thinking": THINKING,
        "cache_control": EPHEMERAL,
        "tools": [{**tool, "cache_control": EPHEMERAL}],
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "S", "cache_control": EPHEMERAL}]},
            {"role": "user", "content": [{"type": "text", "text": "U", "cache_control": EPHEMERAL}]},
            {"role": "assistant", "content": "A", "thinking_blocks": blocks},
            {"role": "user", "content": "Again"},
        ],
    }


def test_each_anthropic_only_part_goes_where_messages_wants_it() -> None:
    wire = chat_to_messages(_full_body(), model="m", default_max_tokens=1)
    marked = {"type": "text", "cache_control": EPHEMERAL}
    assert wire["system"] == [{**marked, "text": "S"}]
    assert wire["messages"][0] == {"role": "user", "content": [{**marked, "text": "U"}]}  # never shortened
    assert wire["messages"][1]["content"] == [
        *_full_body()["messages"][2]["thinking_blocks"],
        {"type": "text", "text": "A"},
    ]
    assert wire["tools"][0]["cache_control"] == EPHEMERAL
    assert wire["thinking"] == THINKING and wire["cache_control"] == EPHEMERAL


def test_an_openai_deployment_gets_the_body_without_them_and_the_original_stays() -> None:
    body = _full_body()
    plain = without_anthropic_parts(body)
    assert anthropic_parts(body) == ["cache_control", "thinking"] and anthropic_parts(plain) == []
    assert "cache_control" not in str(plain) and "thinking" not in str(plain)
    assert body == _full_body()  # not changed
    untouched = {"model": "r", "messages": [{"role": "user", "content": "hi"}]}
    assert without_anthropic_parts(untouched) is untouched


# --- adapters against the simulator over HTTP -----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_writes_the_prefix_to_its_cache_then_reads_it(sim: SimControl, stream: bool) -> None:
    """The system prompt up to its breakpoint is written on first sight and read after; Usage counts
    every prompt token, as genai-prices expects, and the reads cost less than the writes."""
    sim.configure(anthropic_cache_min_tokens=50)
    deployment = _deployment("anthropic", sim.url, stream=stream)
    first = _call(deployment, _cached_body())
    prefix = count_prompt_tokens([], system=[{"type": "text", "text": SYSTEM}])
    assert (first.usage.cache_write_tokens, first.usage.cache_read_tokens) == (prefix, 0)
    second = _call(deployment, _cached_body("And a water wheel's power?"))
    assert (second.usage.cache_write_tokens, second.usage.cache_read_tokens) == (0, prefix)
    records = sim.stats(records=2)["records"]
    assert [r["input_tokens"] for r in records] == [first.usage.input_tokens, second.usage.input_tokens]
    assert [r["cache_read_tokens"] for r in records] == [0, prefix]
    details = second.body["usage"]["prompt_tokens_details"]
    assert details == {"cached_tokens": prefix, "cache_write_tokens": 0}
    assert call_cost_usd(deployment, second.usage) < call_cost_usd(deployment, first.usage)  # type: ignore[operator]


def test_anthropic_caches_nothing_below_its_minimum_nor_without_a_breakpoint(sim: SimControl) -> None:
    deployment = _deployment("anthropic", sim.url)
    for _ in range(2):  # 1024 tokens by default: this prompt is shorter
        assert _call(deployment, _cached_body()).usage.cache_read_tokens == 0
    sim.configure(anthropic_cache_min_tokens=50)
    unmarked = {
        "model": "r",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "q"}],
    }
    for _ in range(2):
        usage = _call(deployment, unmarked).usage
        assert (usage.cache_read_tokens, usage.cache_write_tokens) == (0, 0)


def test_openai_caches_long_prompts_by_itself_in_128_token_steps(sim: SimControl) -> None:
    sim.configure(openai_cache_min_tokens=100)
    deployment = _deployment("openai", sim.url)
    system = {"role": "system", "content": SYSTEM * 2}
    first = _call(deployment, {"model": "r", "messages": [system, {"role": "user", "content": "one"}]})
    second = _call(deployment, {"model": "r", "messages": [system, {"role": "user", "content": "two"}]})
    seen = count_prompt_tokens([system])  # the prefix both share: priming + the system message
    assert first.usage.cache_read_tokens == 0
    assert second.usage.cache_read_tokens == 100 + (seen - 100) // 128 * 128 > 0
    assert second.usage.input_tokens == first.usage.input_tokens  # prompt_tokens includes the cached


def test_the_openai_adapter_never_sends_cache_control_or_thinking(sim: SimControl) -> None:
    """The simulator answers 400 to them, as OpenAI does to fields it does not know; through the
    adapter the same body is answered."""
    body = _full_body()
    raw = httpx.post(
        f"{sim.url}/v1/chat/completions",
        json={**body, "model": "gpt-4o-mini"},
        headers={"Authorization": "Bearer sk-test"},
    )
    assert (
        raw.status_code == 400 and "Unrecognized request argument supplied" in raw.json()["error"]["message"]
    )
    reply = _call(_deployment("openai", sim.url), body)
    assert reply.body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_comes_back_and_goes_back_unmodified(sim: SimControl, stream: bool) -> None:
    deployment = _deployment("anthropic", sim.url, stream=stream)
    question = {"role": "user", "content": "Why an overshot wheel?"}
    first = _call(
        deployment, {"model": "r", "max_tokens": 2000, "thinking": THINKING, "messages": [question]}
    )
    message = first.body["choices"][0]["message"]
    (block,) = message["thinking_blocks"]
    assert block["type"] == "thinking" and block["signature"] == signature(block["thinking"])
    assert message["reasoning_content"] == block["thinking"] and message["content"]
    turn = {"role": "assistant", "content": message["content"], "thinking_blocks": [block]}
    history = [question, turn, {"role": "user", "content": "And undershot?"}]
    again = {"model": "r", "max_tokens": 2000, "thinking": THINKING, "messages": history}
    assert _call(deployment, again).body["choices"][0]["message"]["thinking_blocks"]
    turn["thinking_blocks"] = [{**block, "thinking": block["thinking"] + " (edited)"}]
    call = ProviderCall(
        deployment=deployment, body=again, timeout_s=5.0, connect_timeout_s=1.0, default_max_tokens=64
    )
    refused = call_provider(AnthropicAdapter(), call)
    assert isinstance(refused, CallFailed) and refused.status == 400 and "signature" in refused.message


# --- the simulator's cache -------------------------------------------------------------------------


def test_the_simulators_cache_is_bounded_and_forgets_the_least_recently_used() -> None:
    now = [0.0]
    cache = PromptCache(max_entries=2, clock=lambda: now[0])
    a, b, c = (CachePoint(name, 100) for name in "abc")
    for point in (a, b, a, c):  # a used again: b is the oldest when c comes
        cache.settle("k", (point,), min_tokens=10, step=0)
    assert cache.settle("k", (a,), min_tokens=10, step=0).read_tokens == 100
    assert cache.settle("k", (b,), min_tokens=10, step=0).read_tokens == 0
    now[0] += 301  # past the 5 minutes
    assert cache.settle("k", (a,), min_tokens=10, step=0).read_tokens == 0


def test_more_than_four_breakpoints_is_a_400(sim: SimControl) -> None:
    parts = [{"type": "text", "text": f"p{i}", "cache_control": EPHEMERAL} for i in range(5)]
    call = ProviderCall(
        deployment=_deployment("anthropic", sim.url),
        body={"model": "r", "messages": [{"role": "user", "content": parts}]},
        timeout_s=5.0,
        connect_timeout_s=1.0,
        default_max_tokens=64,
    )
    failed = call_provider(AnthropicAdapter(), call)
    assert isinstance(failed, CallFailed) and failed.status == 400 and "maximum of 4" in failed.message


# --- the pipeline, in-process, on both databases ---------------------------------------------------


def _config(sim: str) -> str:
    dead = f"http://127.0.0.1:{free_port()}"
    return f"""
[[deployments]]
name = "an"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{sim}"
api_key_env = "{KEY_ENV}"

[[deployments]]
name = "an-down"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{dead}"
api_key_env = "{KEY_ENV}"

[[deployments]]
name = "oa"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{KEY_ENV}"

[[routes]]
name = "claude"
deployments = ["an", "oa"]

[[routes]]
name = "claude-down"
deployments = ["an-down", "oa"]
"""


@pytest.fixture
def deps(db: Database, sim: SimControl, redis: redis_lib.Redis) -> Deps:
    return pipeline_deps(db, _config(sim.url), redis, max_attempts_per_deployment=2, call_timeout_s=2)


def _run(deps: Deps, route: str, bodies: list[dict[str, Any]]) -> list[tuple[LlmRequest, list[Attempt]]]:
    tenant = create_api_key(deps.db, "t").tenant_id
    lines = [BatchLine(i + 1, f"c{i}", route, {**b, "model": route}) for i, b in enumerate(bodies)]
    batch = create_batch(deps.db, BatchSpec(tenant, Priority.DEFAULT, None, 3600), lines)
    with deps.db.session() as session:
        ids = list(
            session.scalars(
                select(LlmRequest.id).where(LlmRequest.batch_id == batch.id).order_by(LlmRequest.line_no)
            )
        )
    for request_id in ids:  # one after the other: the second finds the first's prefix cached
        run_request(request_id, deps)
    with deps.db.session() as session:
        out = []
        for request_id in ids:
            request = session.get(LlmRequest, request_id)
            assert request is not None
            query = select(Attempt).where(Attempt.request_id == request_id).order_by(Attempt.attempt_no)
            out.append((request, list(session.scalars(query))))
        return out


def test_cache_tokens_are_recorded_on_attempts_and_requests_and_priced_exactly(
    deps: Deps, sim: SimControl
) -> None:
    sim.configure(anthropic_cache_min_tokens=50)
    prefix = count_prompt_tokens([], system=[{"type": "text", "text": SYSTEM}])
    (first, (write,)), (second, (read,)) = _run(deps, "claude", [_cached_body(), _cached_body("Why oak?")])
    assert (write.cache_write_tokens, write.cache_read_tokens) == (prefix, 0)
    assert (read.cache_write_tokens, read.cache_read_tokens) == (0, prefix)
    assert (first.cache_write_tokens, second.cache_read_tokens) == (prefix, prefix)  # the requests' sums
    usage = Usage(read.input_tokens, read.output_tokens, cache_read_tokens=prefix)
    assert read.cost_usd == second.cost_usd == _genai_cost("claude-3-5-haiku-latest", "anthropic", usage)
    uncached = _genai_cost(
        "claude-3-5-haiku-latest", "anthropic", Usage(read.input_tokens, read.output_tokens)
    )
    assert read.cost_usd < uncached  # type: ignore[operator]
    assert second.notes is None


def test_a_request_an_openai_deployment_answers_says_what_it_was_not_sent(deps: Deps) -> None:
    """Anthropic unreachable, the chain falls back to OpenAI: it answers without the cache breakpoints
    and the thinking (the simulator would refuse them), and the result line says they were dropped."""
    ((request, attempts),) = _run(deps, "claude-down", [_full_body()])
    assert request.status == "succeeded" and request.deployment == "oa"
    assert [a.deployment for a in attempts] == ["an-down", "an-down", "oa"]
    assert result_line(request)["dropped_for_openai"] == ["cache_control", "thinking"]
