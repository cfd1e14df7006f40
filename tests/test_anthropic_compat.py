"""The Anthropic Message Batches API, driven by the official `anthropic` SDK unmodified: create,
retrieve, list, cancel, delete and results, with every object parsed by the SDK's own types."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import genai_prices
import httpx
import pytest
from anthropic.types.messages import MessageBatch

from headrace.stack import EmbeddedStack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("anthropic-compat"),
        worker_concurrency=4,
        simulator_args=("--latency-ms", "30"),
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def client(stack: EmbeddedStack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{stack.api_url}/anthropic", api_key=stack.api_key)


def request(custom_id: str, text: str = "Hello", model: str = "smart", **params: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "params": {
            "model": model,
            "max_tokens": 40,
            "system": "Be brief.",
            "messages": [{"role": "user", "content": text}],
            **params,
        },
    }


def wait(client: anthropic.Anthropic, batch_id: str, timeout_s: float = 90) -> MessageBatch:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not end")


def test_create_poll_and_read_typed_results(client: anthropic.Anthropic, http: httpx.Client) -> None:
    """Counts stay 'processing' until the end, as on Anthropic; results come through results_url,
    parsed into the SDK's types: messages for the good requests, errored for bad params."""
    batch = client.messages.batches.create(
        requests=[
            request("ok-1"),
            request("ok-2", model="fast", stop_sequences=["zzz"]),
            request("bad-model", model="no-such-route"),
            request("bad-params", messages=[{"role": "system", "content": "no"}]),
        ]
    )
    assert batch.processing_status == "in_progress" and batch.results_url is None
    assert batch.request_counts.processing == 4 and batch.request_counts.succeeded == 0
    done = wait(client, batch.id)
    assert (
        done.ended_at
        and done.results_url
        and done.results_url.endswith(f"/anthropic/v1/messages/batches/{batch.id}/results")
    )
    assert (done.request_counts.succeeded, done.request_counts.errored, done.request_counts.processing) == (
        2,
        2,
        0,
    )
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    for ok in ("ok-1", "ok-2"):
        assert results[ok].type == "succeeded" and results[ok].message.content[0].type == "text"  # type: ignore[union-attr]
        assert results[ok].message.usage.output_tokens > 0  # type: ignore[union-attr]
    for bad in ("bad-model", "bad-params"):
        assert results[bad].type == "errored"
        assert results[bad].error.error.type == "invalid_request_error"  # type: ignore[union-attr]
    assert "no-such-route" in results["bad-model"].error.error.message  # type: ignore[union-attr]
    native = http.get(f"/v1/batches/{batch.id}").json()
    assert native["request_counts"]["completed"] == 2 and float(native["cost_usd"]) > 0


def test_list_paginates_with_the_sdk(client: anthropic.Anthropic) -> None:
    created = [client.messages.batches.create(requests=[request(f"l{i}")]).id for i in range(3)]
    seen = [b.id for b in client.messages.batches.list(limit=2)]
    assert seen[:3] == list(reversed(created)) and len(seen) == len(set(seen))
    page = client.messages.batches.list(limit=1, before_id=created[0])
    assert [b.id for b in page.data] == [created[1]]


def test_cancel_then_delete(client: anthropic.Anthropic) -> None:
    """Cancel: 'canceling', then ended with canceled results for what had not run; a batch in
    progress cannot be deleted, an ended one can, and is gone from this API afterwards."""
    batch = client.messages.batches.create(
        requests=[request(f"c{i}", "[[sim:latency_ms=200]] slow") for i in range(120)]
    )
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.delete(batch.id)
    time.sleep(0.4)
    canceling = client.messages.batches.cancel(batch.id)
    assert canceling.processing_status in ("canceling", "ended") and canceling.cancel_initiated_at
    done = wait(client, batch.id)
    assert done.request_counts.canceled > 60
    assert done.request_counts.canceled + done.request_counts.succeeded == 120
    kinds = {r.result.type for r in client.messages.batches.results(batch.id)}
    assert "canceled" in kinds
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_envelope_problems_are_refused_in_anthropics_shape(
    client: anthropic.Anthropic, stack: EmbeddedStack
) -> None:
    with pytest.raises(anthropic.BadRequestError, match="duplicate custom_id"):
        client.messages.batches.create(requests=[request("same"), request("same")])
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        client.messages.batches.create(requests=[request("has spaces")])
    with pytest.raises(anthropic.BadRequestError, match="non-empty"):
        client.messages.batches.create(requests=[])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_nope")
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=f"{stack.api_url}/anthropic", api_key="hr_wrong", max_retries=0
        ).messages.batches.list()


def test_older_sdks_x_api_key_is_accepted(stack: EmbeddedStack) -> None:
    """Anthropic SDKs before 2.0 send the key as x-api-key, with anthropic-version 2023-06-01."""
    response = httpx.get(
        f"{stack.api_url}/anthropic/v1/messages/batches",
        headers={"x-api-key": stack.api_key, "anthropic-version": "2023-06-01"},
    )
    assert response.status_code == 200 and "data" in response.json()
    missing = httpx.post(
        f"{stack.api_url}/anthropic/v1/messages/batches",
        json={"requests": [request("v")]},
        headers={"x-api-key": stack.api_key},
    )
    assert missing.status_code == 400 and missing.json()["type"] == "error"
    assert missing.json()["error"] == {
        "type": "invalid_request_error",
        "message": "anthropic-version: header is required",
    }


def test_prompt_caching_and_thinking_reach_the_anthropic_deployment(
    client: anthropic.Anthropic, http: httpx.Client
) -> None:
    """cache_control on the system prompt reaches the deployment (Anthropic's first on route smart):
    the second batch reads what the first wrote, and is costed at genai-prices' cache-read rate;
    the thinking asked for comes back as a thinking block, signed."""
    system = [{"type": "text", "text": "You know mill races. " * 300, "cache_control": {"type": "ephemeral"}}]
    thinking = {"type": "enabled", "budget_tokens": 1024}
    found = []
    for i in range(2):  # one after the other: the second finds the first's prefix cached
        line = request(f"cached-{i}", f"Question {i}?", system=system, max_tokens=2048, thinking=thinking)
        batch = client.messages.batches.create(requests=[line])
        wait(client, batch.id)
        (result,) = client.messages.batches.results(batch.id)
        assert result.result.type == "succeeded", result.result
        found.append((batch.id, result.result.message))
    (_, first), (batch_id, second) = found
    written = first.usage.cache_creation_input_tokens
    assert written and written > 1024 and not first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens == written and not second.usage.cache_creation_input_tokens
    assert second.content[0].type == "thinking" and second.content[0].signature
    assert second.content[-1].type == "text"
    usage = second.usage
    price = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens + written,
            output_tokens=usage.output_tokens,
            cache_read_tokens=written,
        ),
        model_ref="claude-sonnet-4-5",
        provider_id="anthropic",
    )
    assert Decimal(http.get(f"/v1/batches/{batch_id}").json()["cost_usd"]) == price.total_price
