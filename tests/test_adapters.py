"""What the adapters send and keep, against the simulator through the official SDKs: the output cap
admission reserved, one client (and connection pool) per endpoint whatever the timeout, and a 429
that stays a 429 whatever its retry-after says."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from typing import Any

import pytest

from broker_config.deployments import Deployment
from tests.simulator_fixture import SimControl
from workers.admission import DEFAULT_PAUSE_S, MAX_PAUSE_S, Estimate, estimate_call, settlement
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import CallFailed, ProviderAdapter, ProviderCall, ProviderReply, call_provider
from workers.providers.headers import retry_after_s
from workers.providers.openai import OpenAIAdapter, output_cap_field

KEY_ENV = "HEADRACE_TEST_SIM_KEY"


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _deployment(provider: str, base: str, **extra: Any) -> Deployment:
    return Deployment(
        name=f"{provider}-d",
        provider=provider,  # type: ignore[arg-type]
        model="gpt-4o-mini" if provider == "openai" else "claude-3-5-haiku-latest",
        base_url=f"{base}/v1" if provider == "openai" else base,
        api_key_env=KEY_ENV,
        **extra,
    )


def _call(deployment: Deployment, text: str = "hello", **body: Any) -> ProviderCall:
    return ProviderCall(
        deployment=deployment,
        body={"model": "route", "messages": [{"role": "user", "content": text}], **body},
        timeout_s=5.0,
        connect_timeout_s=1.0,
        # As the pipeline builds it: the deployment's own cap, else the default.
        default_max_tokens=deployment.max_output_tokens or 64,
    )


def _adapter(provider: str) -> ProviderAdapter:
    return OpenAIAdapter() if provider == "openai" else AnthropicAdapter()


# --- the output cap: what is reserved is what is sent --------------------------------------------


@pytest.mark.parametrize("max_output_tokens", [None, 50])
def test_an_uncapped_openai_request_uses_no_more_output_than_was_reserved(
    sim: SimControl, max_output_tokens: int | None
) -> None:
    """Left alone the model answers 300+ tokens; admission reserved 64 (or the deployment's 50),
    and the adapter sends that cap, so the answer fits the reservation."""
    sim.configure(min_output_tokens=300, max_output_tokens=400)
    deployment = _deployment("openai", sim.url, max_output_tokens=max_output_tokens)
    call = _call(deployment, "Tell me everything about mill races")
    reserved = estimate_call(deployment, call.body, default_max_tokens=64).output_tokens
    reply = call_provider(OpenAIAdapter(), call)
    assert isinstance(reply, ProviderReply), reply
    assert reserved == (max_output_tokens or 64)
    assert 0 < reply.usage.output_tokens <= reserved
    (record,) = sim.stats(records=10)["records"]
    assert record["reserved_tokens"] == reserved  # the cap reached the provider
    assert "max_tokens" not in call.body  # the producer's body is left as it was


def test_a_producers_own_cap_is_sent_as_given_and_reserved_as_given(sim: SimControl) -> None:
    deployment = _deployment("openai", sim.url)
    call = _call(deployment, max_completion_tokens=7)
    reply = call_provider(OpenAIAdapter(), call)
    assert isinstance(reply, ProviderReply) and reply.usage.output_tokens <= 7
    assert estimate_call(deployment, call.body, default_max_tokens=64).output_tokens == 7
    assert sim.stats(records=10)["records"][0]["reserved_tokens"] == 7


def test_the_cap_goes_in_the_field_each_kind_of_endpoint_reads() -> None:
    """OpenAI's own API rejects max_tokens on newer models; compatible servers read max_tokens."""
    assert output_cap_field("api.openai.com") == "max_completion_tokens"
    assert output_cap_field("myres.openai.azure.com") == "max_completion_tokens"
    for host in ("127.0.0.1", "vllm.internal", "openrouter.ai", "api.openai.com.evil.example"):
        assert output_cap_field(host) == "max_tokens"


# --- one client per endpoint ---------------------------------------------------------------------


def _open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed between the listing and the look
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_500_calls_with_deadline_clipped_timeouts_share_one_client_and_its_sockets(
    provider: str, sim: SimControl
) -> None:
    """The pipeline clips each attempt's timeout to its request's deadline, so no two timeouts are
    alike: the process's open sockets must not grow with the number of calls."""
    adapter = _adapter(provider)
    call = _call(_deployment(provider, sim.url))
    assert isinstance(call_provider(adapter, call), ProviderReply)  # warm: the pool has its connection
    before = _open_sockets()
    for i in range(500):
        clipped = replace(call, timeout_s=5.0 - i * 0.007)
        assert isinstance(call_provider(adapter, clipped), ProviderReply)
    assert _open_sockets() - before <= 2


def test_a_call_still_times_out_at_its_own_timeout_on_a_shared_client(sim: SimControl) -> None:
    """The timeout travels with each call: a short one after a long one on the same client cuts."""
    adapter = OpenAIAdapter()
    call = _call(_deployment("openai", sim.url))
    assert isinstance(call_provider(adapter, call), ProviderReply)
    failure = call_provider(adapter, replace(call, timeout_s=0.3, body={**call.body, "messages": _hang()}))
    assert isinstance(failure, CallFailed) and failure.kind == "timeout"


def _hang() -> list[dict[str, str]]:
    return [{"role": "user", "content": "[[sim:hang=2]] hi"}]


# --- a 429 stays a 429 ---------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("raw", ["soon", "", "Wed%2C%2099%20Foo"])
def test_a_429_with_an_unreadable_retry_after_stays_a_429_with_the_default_pause(
    provider: str, raw: str, sim: SimControl
) -> None:
    """Not an invalid reply: the policy sees kind=status, status=429 (retried) and the bucket pauses
    the deployment for the default pause."""
    deployment = _deployment(provider, sim.url)
    call = _call(deployment, f"[[sim:status=429,retry_after_raw={raw}]]")
    failure = call_provider(_adapter(provider), call)
    assert isinstance(failure, CallFailed), failure
    assert (failure.kind, failure.status, failure.retry_after_s) == ("status", 429, None)
    settled = settlement(deployment, Estimate(10, 64), failure)
    assert settled.rate_limited and settled.pause_s == DEFAULT_PAUSE_S


@pytest.mark.parametrize(
    "value",
    ["soon", "", " ", "Wed, 99 Foo", "nan", "inf", "-inf", "1e999", "Wed, 21 Oct 99999 07:28:00 GMT", "\x00"],
)
def test_retry_after_never_raises_and_never_answers_a_non_finite_wait(value: str) -> None:
    for headers in ({"retry-after": value}, {"retry-after-ms": value}, {"Retry-After": value}):
        seconds = retry_after_s(headers)
        assert seconds is None or 0 <= seconds < float("inf")


def test_retry_after_reads_seconds_milliseconds_and_dates() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after-ms": "junk", "retry-after": "9"}) == 9
    assert retry_after_s({"retry-after": "-3"}) == 0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0  # in the past
    assert retry_after_s({"retry-after": "Fri, 01 Jan 9999 00:00:00 -0000"}) > 2e11
    assert retry_after_s({}) is None


def test_a_429_asking_for_hours_pauses_the_deployment_for_at_most_the_cap() -> None:
    """One header must not hold a deployment shut for everyone for a day."""
    deployment = Deployment(name="d", provider="openai", model="m")
    day = CallFailed("slow down", kind="status", status=429, retry_after_s=86_400)
    assert settlement(deployment, Estimate(10, 64), day).pause_s == MAX_PAUSE_S
