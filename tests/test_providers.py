"""Adapters and the policy against the simulator, through the real SDKs: every outcome the
providers can produce is classified case by case from the SDK exception it really raises."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from broker_config.deployments import Deployment
from headrace.embedded import free_port
from tests.simulator_fixture import SimControl
from workers.costing import call_cost_usd
from workers.policy import FAIL, FALL_BACK, RETRY, Decision, backoff_s, decide
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import CallFailed, ProviderCall, ProviderReply, call_provider
from workers.providers.openai import OpenAIAdapter

KEY_ENV = "HEADRACE_TEST_SIM_KEY"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _deployment(provider: str, base: str, **extra: Any) -> Deployment:
    base_url = f"{base}/v1" if provider == "openai" else base
    model = "gpt-4o-mini" if provider == "openai" else "claude-3-5-haiku-latest"
    return Deployment(
        name=f"{provider}-d",
        provider=provider,
        model=model,
        base_url=base_url,  # type: ignore[arg-type]
        api_key_env=KEY_ENV,
        **extra,
    )


def _call(provider: str, base: str, text: str = "hello", timeout_s: float = 5.0, **body: Any) -> ProviderCall:
    return ProviderCall(
        deployment=_deployment(provider, base),
        body={
            "model": "route",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
            **body,
        },
        timeout_s=timeout_s,
        connect_timeout_s=1.0,
        default_max_tokens=64,
    )


def _run(provider: str, base: str, text: str = "hello", **kwargs: Any) -> ProviderReply | CallFailed:
    adapter = OpenAIAdapter() if provider == "openai" else AnthropicAdapter()
    return call_provider(adapter, _call(provider, base, text, **kwargs))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_successful_call_gives_a_canonical_completion_with_usage_and_a_price(
    provider: str, sim: SimControl
) -> None:
    """Both providers answer a chat.completion the OpenAI SDK parses, with billed tokens and a cost."""
    reply = _run(provider, sim.url, max_tokens=40, stop=["zzz"], temperature=0.5)
    assert isinstance(reply, ProviderReply), reply
    completion = ChatCompletion.model_validate(reply.body)
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens == reply.usage.output_tokens
    assert reply.usage.input_tokens > 0 and reply.http_status == 200 and reply.provider_request_id
    cost = call_cost_usd(_deployment(provider, sim.url), reply.usage)
    assert isinstance(cost, Decimal) and cost > 0


@pytest.mark.parametrize(
    ("provider", "directive", "status", "step"),
    [
        ("openai", "[[sim:status=429]] [[sim:retry_after=3]]", 429, RETRY),
        ("anthropic", "[[sim:status=429]] [[sim:retry_after=3]]", 429, RETRY),
        ("openai", "[[sim:status=500]]", 500, RETRY),
        ("openai", "[[sim:status=503]]", 503, RETRY),
        ("anthropic", "[[sim:status=529]]", 529, RETRY),
        ("anthropic", "[[sim:status=500]]", 500, RETRY),
        ("openai", "[[sim:status=400]]", 400, FAIL),
        ("anthropic", "[[sim:status=400]]", 400, FAIL),
        ("openai", "[[sim:status=422]]", 422, FAIL),
        ("anthropic", "[[sim:status=413]]", 413, FAIL),
        ("openai", "[[sim:error=context_length]]", 400, FALL_BACK),
        ("anthropic", "[[sim:error=context_length]]", 400, FALL_BACK),
        ("openai", "[[sim:status=401]]", 401, FALL_BACK),
        ("anthropic", "[[sim:status=403]]", 403, FALL_BACK),
        ("openai", "[[sim:status=404]]", 404, FALL_BACK),
    ],
)
def test_provider_errors_are_classified(
    provider: str, directive: str, status: int, step: Decision, sim: SimControl
) -> None:
    failure = _run(provider, sim.url, f"{directive} please")
    assert isinstance(failure, CallFailed) and failure.kind == "status" and failure.status == status
    assert decide(failure) is step
    if status == 429:
        assert failure.retry_after_s == pytest.approx(3, abs=0.01)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_hung_call_is_cut_at_its_timeout_and_retried(provider: str, sim: SimControl) -> None:
    failure = _run(provider, sim.url, "[[sim:hang]]", timeout_s=0.5)
    assert isinstance(failure, CallFailed) and failure.kind == "timeout" and decide(failure) is RETRY


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_refused_connection_is_retried(provider: str) -> None:
    failure = _run(provider, f"http://127.0.0.1:{free_port()}")
    assert isinstance(failure, CallFailed) and failure.kind == "connection" and decide(failure) is RETRY


def test_a_deployment_without_its_key_falls_back(monkeypatch: pytest.MonkeyPatch, sim: SimControl) -> None:
    monkeypatch.delenv(KEY_ENV)
    failure = _run("openai", sim.url)
    assert isinstance(failure, CallFailed) and failure.kind == "unavailable" and KEY_ENV in failure.message
    assert decide(failure) is FALL_BACK


def test_a_request_anthropic_cannot_express_fails_without_a_call(sim: SimControl) -> None:
    """n=2 has no Anthropic equivalent: the request's fault, decided before any call is made."""
    failure = _run("anthropic", sim.url, n=2)
    assert isinstance(failure, CallFailed) and failure.kind == "translation" and decide(failure) is FAIL
    assert sum(sim.stats()["received"].values()) == 0


def test_rate_limit_headers_are_kept_for_the_bucket(sim: SimControl) -> None:
    sim.configure(rpm=1000, tpm=100000)
    reply = _run("openai", sim.url)
    assert isinstance(reply, ProviderReply)
    assert reply.headers["x-ratelimit-limit-requests"] == "1000"
    assert "x-ratelimit-remaining-tokens" in reply.headers


def test_backoff_is_full_jitter_capped_and_never_below_retry_after() -> None:
    delays = [backoff_s(3, base_s=0.5, max_s=2.0) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in delays) and max(delays) > 1.0 and min(delays) < 1.0
    assert backoff_s(0, base_s=0.5, max_s=2.0, retry_after_s=7.5) == 7.5


def test_unknown_model_price_is_none_and_overrides_are_exact() -> None:
    from workers.providers.base import Usage

    unknown = Deployment(name="x", provider="openai", model="no-such-model-anywhere")
    assert call_cost_usd(unknown, Usage(1000, 1000)) is None
    priced = Deployment(
        name="y",
        provider="openai",
        model="m",
        input_price_per_mtok=Decimal("0.15"),
        output_price_per_mtok=Decimal("0.6"),
    )
    assert call_cost_usd(priced, Usage(1000, 500)) == Decimal("0.00045")


def test_an_exhausted_quota_falls_back_instead_of_waiting() -> None:
    """OpenAI's insufficient_quota is a 429 that no wait cures."""
    quota = CallFailed(
        "You exceeded your current quota", kind="status", status=429, error_code="insufficient_quota"
    )
    assert decide(quota) is FALL_BACK
    assert decide(CallFailed("slow down", kind="status", status=429)) is RETRY
