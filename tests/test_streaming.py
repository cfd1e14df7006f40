"""Streaming: the simulator streams as the providers do, the adapters assemble exactly the reply an
unstreamed call gives (through the official SDKs), and the ledger keeps each streamed call's time
to first chunk and generation time, summed up per batch in GET /v1/batches/{id}."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.batch_service import BatchLine, BatchSpec, create_batch
from broker_config.deployments import Deployment
from broker_config.settings import Settings
from db.engine import get_database
from db.models import Attempt, LlmRequest
from db.states import AttemptOutcome, Priority, RequestStatus
from db.tenants import create_api_key
from headrace.simulator.streams import pieces
from headrace.stack import DEFAULT_CONFIG
from tests.simulator_fixture import SimControl
from tests.test_ledger import CLAIM
from workers import ledger
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import (
    CallFailed,
    ProviderAdapter,
    ProviderCall,
    ProviderReply,
    Usage,
    call_provider,
)
from workers.providers.openai import OpenAIAdapter

KEY_ENV = "HEADRACE_TEST_SIM_KEY"
GPT, CLAUDE = "gpt-4o-mini", "claude-sonnet-4-5"
TOOLS = [{"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _deployment(provider: str, base: str, *, stream: bool) -> Deployment:
    return Deployment(
        name=f"{provider}-d",
        provider=provider,  # type: ignore[arg-type]
        model=GPT if provider == "openai" else CLAUDE,
        base_url=f"{base}/v1" if provider == "openai" else base,
        api_key_env=KEY_ENV,
        stream=stream,
    )


def _call(deployment: Deployment, text: str = "Tell me about weirs", **body: Any) -> ProviderCall:
    return ProviderCall(
        deployment=deployment,
        body={"model": "route", "messages": [{"role": "user", "content": text}], **body},
        timeout_s=10.0,
        connect_timeout_s=2.0,
        default_max_tokens=64,
    )


def _adapter(provider: str) -> ProviderAdapter:
    return OpenAIAdapter() if provider == "openai" else AnthropicAdapter()


def _both(provider: str, sim: SimControl, text: str = "Tell me about weirs", **body: Any) -> list[Any]:
    """The same call made unstreamed, then streamed, on a fresh adapter each."""
    return [
        call_provider(_adapter(provider), _call(_deployment(provider, sim.url, stream=stream), text, **body))
        for stream in (False, True)
    ]


def _essence(reply: ProviderReply) -> dict[str, Any]:
    """What a result line says, without what differs call by call (ids, times)."""
    (choice,) = reply.body["choices"]
    message = dict(choice["message"])
    message.pop("annotations", None)  # OpenAI streams annotations only when there are some
    calls = [{**call, "id": call["id"][:5]} for call in message.pop("tool_calls", [])]
    return {
        "object": reply.body["object"],
        "model": reply.body["model"],
        "message": message,
        "tool_calls": calls,
        "finish_reason": choice["finish_reason"],
        "usage": reply.body["usage"],
        "billed": reply.usage,
        "status": reply.http_status,
        "limit_headers": sorted(reply.headers),
    }


# --- the simulator streams like the providers --------------------------------------------------


def test_openai_streams_role_words_finish_usage_and_done(sim: SimControl) -> None:
    """The chunks of a stream with include_usage: the role first, then one word each, a chunk with
    the finish_reason, a last one with no choices and the usage, then [DONE]; their words are
    the unstreamed answer's."""
    sim.configure(rpm=1000, tpm=1_000_000)
    client = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", max_retries=0)
    messages: Any = [{"role": "user", "content": "Tell me about weirs"}]
    whole = client.chat.completions.create(model=GPT, messages=messages, max_tokens=500)
    raw = client.chat.completions.with_raw_response.create(
        model=GPT, messages=messages, max_tokens=500, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-request-id"] and raw.headers["x-ratelimit-remaining-requests"]
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    words = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(w or "" for w in words) == whole.choices[0].message.content
    assert len(words) == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_openai_streams_no_usage_chunk_unless_asked(sim: SimControl) -> None:
    client = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", max_retries=0)
    chunks = list(
        client.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert chunks[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in chunks)


def test_anthropic_streams_the_message_events_in_order(sim: SimControl) -> None:
    """message_start (input tokens), a text block's start, deltas and stop, message_delta (stop
    reason, output tokens), message_stop; the events add up to the unstreamed Message."""
    sim.configure(anthropic_rpm=1000)
    client = anthropic.Anthropic(base_url=sim.url, api_key="sk-test", max_retries=0)
    messages: Any = [{"role": "user", "content": "Tell me about weirs"}]
    whole = client.messages.create(model=CLAUDE, max_tokens=500, messages=messages)
    events = list(client.messages.create(model=CLAUDE, max_tokens=500, messages=messages, stream=True))
    kinds = [e.type for e in events]
    deltas = kinds.count("content_block_delta")
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens  # type: ignore[union-attr]
    assert deltas == whole.usage.output_tokens
    assert events[-2].usage.output_tokens == whole.usage.output_tokens  # type: ignore[union-attr]
    with client.messages.stream(model=CLAUDE, max_tokens=500, messages=messages) as stream:
        final = stream.get_final_message()
        assert stream.response.headers["anthropic-ratelimit-requests-remaining"]
    assert [b.to_dict() for b in final.content] == [b.to_dict() for b in whole.content]
    assert final.stop_reason == whole.stop_reason == "end_turn"
    assert final.usage == whole.usage


def test_a_stream_is_recorded_in_the_stats_once_it_has_ended(sim: SimControl) -> None:
    """A role chunk, one chunk per word, the finish and [DONE]; then the call's record, ok."""
    sim.configure(latency_ms=50, min_output_tokens=20, max_output_tokens=20)
    with httpx.Client(base_url=sim.url, timeout=10) as http:
        body = {"model": GPT, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        headers = {"authorization": "Bearer k"}
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(lines) == 1 + 20 + 1 + 1 and lines[-1] == "data: [DONE]"
    (record,) = sim.stats(records=5)["records"]
    assert (record["status"], record["outcome"], record["output_tokens"]) == (200, "ok", 20)


def test_a_streamed_call_is_refused_before_its_stream_when_the_body_is_wrong(sim: SimControl) -> None:
    headers = {"authorization": "Bearer k"}
    for extra in ({"stream": "yes"}, {"stream_options": {"include_usage": True}}):
        body = {"model": GPT, "messages": [{"role": "user", "content": "hi"}], **extra}
        response = sim.http.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["param"] in (
            "stream",
            "stream_options",
        )


def test_pieces_cut_before_each_space_and_join_back_exactly() -> None:
    for text in ("One two three.", "", "a", " lead", "trail ", "two  spaces", '{"text": "a b"}'):
        assert "".join(pieces(text)) == text
    assert pieces("One two three.") == ["One", " two", " three."]


# --- the adapters: streamed replies are the unstreamed ones --------------------------------------


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("body", [{}, {"max_tokens": 7}, {"stop": ["the"]}])
def test_a_streamed_reply_equals_the_unstreamed_one(
    provider: str, body: dict[str, Any], sim: SimControl
) -> None:
    """Same content, finish reason, usage, rate-limit headers and status, streamed or not; only
    the streamed reply has a time to first chunk and a count of chunks (one per output token)."""
    plain, streamed = _both(provider, sim, **body)
    assert isinstance(plain, ProviderReply) and isinstance(streamed, ProviderReply), (plain, streamed)
    assert _essence(streamed) == _essence(plain)
    assert plain.first_chunk_s is None and plain.chunks is None
    assert streamed.first_chunk_s is not None and streamed.first_chunk_s > 0
    assert streamed.chunks == streamed.usage.output_tokens
    assert streamed.provider_request_id and streamed.provider_request_id != plain.provider_request_id


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "note"}}])
def test_a_streamed_tool_call_equals_the_unstreamed_one(
    provider: str, tool_choice: Any, sim: SimControl
) -> None:
    """A forced tool call, its arguments streamed in pieces, assembles to the same call."""
    plain, streamed = _both(provider, sim, tools=TOOLS, tool_choice=tool_choice)
    assert isinstance(plain, ProviderReply) and isinstance(streamed, ProviderReply), (plain, streamed)
    assert _essence(streamed) == _essence(plain)
    essence = _essence(streamed)
    assert essence["finish_reason"] == "tool_calls" and essence["message"]["content"] is None
    (call,) = essence["tool_calls"]
    assert call["function"]["name"] == "note" and "text" in json.loads(call["function"]["arguments"])
    assert streamed.chunks and streamed.chunks > 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("status", [500, 529])
def test_a_fault_before_the_stream_is_the_same_failure_as_unstreamed(
    provider: str, status: int, sim: SimControl
) -> None:
    plain, streamed = _both(provider, sim, f"[[sim:status={status}]] hi")
    for failure in (plain, streamed):
        assert isinstance(failure, CallFailed), failure
        assert (failure.kind, failure.status, failure.sent) == ("status", status, True)
        assert failure.provider_request_id
    assert streamed.error_type == plain.error_type and streamed.message == plain.message


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_429_before_the_stream_carries_its_wait_and_limit_headers(provider: str, sim: SimControl) -> None:
    """The simulator's own limiter refuses the second call of the minute, streamed or not."""
    sim.configure(rpm=1, anthropic_rpm=1)
    for stream in (False, True):
        sim.reset()
        deployment = _deployment(provider, sim.url, stream=stream)
        assert isinstance(call_provider(_adapter(provider), _call(deployment)), ProviderReply)
        failure = call_provider(_adapter(provider), _call(deployment))
        assert isinstance(failure, CallFailed), failure
        assert (failure.kind, failure.status) == ("status", 429)
        assert failure.retry_after_s and failure.retry_after_s > 0
        remaining = (
            "x-ratelimit-remaining-requests"
            if provider == "openai"
            else ("anthropic-ratelimit-requests-remaining")
        )
        assert failure.headers[remaining] == "0"
        assert sim.stats()["outcomes"][provider]["rate_limited"] == 1


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("after", [0, 3])
def test_a_stream_that_breaks_midway_is_a_connection_failure_that_was_sent(
    provider: str, after: int, sim: SimControl
) -> None:
    """The provider answered 200 and may have billed: the policy must count it as sent."""
    deployment = _deployment(provider, sim.url, stream=True)
    failure = call_provider(_adapter(provider), _call(deployment, f"[[sim:stream_break={after}]] hi"))
    assert isinstance(failure, CallFailed), failure
    assert (failure.kind, failure.sent) == ("connection", True)
    (record,) = sim.stats(records=5)["records"]
    assert (record["status"], record["outcome"]) == (200, "stream_broken")


def test_a_refused_connection_was_not_sent(sim: SimControl) -> None:
    """Nothing listens there: the SDKs (on httpx2) raise a connect error, which was never sent."""
    for stream in (False, True):
        deployment = _deployment("openai", sim.url, stream=stream).model_copy(
            update={"base_url": "http://127.0.0.1:9/v1"}
        )
        failure = call_provider(OpenAIAdapter(), _call(deployment))
        assert isinstance(failure, CallFailed) and (failure.kind, failure.sent) == ("connection", False)


# --- the ledger and the batch view ---------------------------------------------------------------


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(database_url=database_url, redis_url=redis_url, config=config)


@pytest.fixture
def client(settings: Settings, redis: redis_lib.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_batch_view_shows_timing_percentiles_of_its_successful_calls(
    settings: Settings, client: TestClient
) -> None:
    """Latency over every successful call; time to first chunk and generation over the streamed
    ones only; failed calls count in none. Attempt rows keep both timings (null unstreamed)."""
    db = get_database(settings.database_url)
    key = create_api_key(db, "acme")
    body = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}
    lines = [BatchLine(i + 1, f"c{i}", "fast", body) for i in range(12)]
    batch = create_batch(db, BatchSpec(key.tenant_id, Priority.BULK, None, 3600), lines, publish=False)
    with db.session() as session:
        ids = list(session.scalars(select(LlmRequest.id).where(LlmRequest.batch_id == batch.id)))
    headers = {"Authorization": f"Bearer {key.key}"}
    view = client.get(f"/v1/batches/{batch.id}", headers=headers).json()
    assert view["usage"]["latency_ms"] is None and view["usage"]["first_chunk_ms"] is None

    def run(rid: str, *results: ledger.AttemptResult) -> None:
        assert ledger.begin_run(db, rid, f"L-{rid}", CLAIM) is not None
        for result in results:
            no = ledger.begin_attempt(
                db,
                rid,
                f"L-{rid}",
                deployment="d",
                provider="openai",
                model="m",
                estimated_input_tokens=1,
                worker="w",
            )
            assert no is not None
            end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response={}) if result.usage else None
            ledger.finish_attempt(db, rid, f"L-{rid}", no, result, end)

    failed = ledger.AttemptResult(AttemptOutcome.RETRY, 9000, http_status=500, error={"kind": "status"})
    for i, rid in enumerate(ids[:10]):  # streamed: first chunk 100..1000 ms, generation 50 ms each
        first = 100 * (i + 1)
        ok = ledger.AttemptResult(
            AttemptOutcome.SUCCESS, first + 50, usage=Usage(1, 1), first_chunk_ms=first, generation_ms=50
        )
        run(rid, *([failed, ok] if i == 0 else [ok]))
    for rid in ids[10:]:  # unstreamed
        run(rid, ledger.AttemptResult(AttemptOutcome.SUCCESS, 2000, usage=Usage(1, 1)))

    usage = client.get(f"/v1/batches/{batch.id}", headers=headers).json()["usage"]
    assert usage["latency_ms"] == {"p50": 650, "p95": 2000, "calls": 12}
    assert usage["first_chunk_ms"] == {"p50": 500, "p95": 1000, "calls": 10}
    assert usage["generation_ms"] == {"p50": 50, "p95": 50, "calls": 10}
    with db.session() as session:
        rows = session.execute(select(Attempt.first_chunk_ms, Attempt.generation_ms)).all()
    assert sorted(rows, key=str).count((None, None)) == 3  # the failed call and the 2 unstreamed
    listed = client.get("/v1/batches", headers=headers).json()["data"][0]["usage"]
    assert listed["latency_ms"] is None  # lists stay cheap
    compat = client.get(f"/openai/v1/batches/{batch.id}", headers=headers).json()
    assert "first_chunk_ms" not in json.dumps(compat)


def test_the_demo_tables_show_time_to_first_chunk_only_when_some_call_streamed() -> None:
    from rich.console import Console

    from db.reports import UsageRow
    from headrace.cli.demo import _usage_table

    def text(rows: list[UsageRow]) -> str:
        console = Console(record=True, width=200)
        console.print(_usage_table("Per deployment", rows, "deployment", "ok"))
        return console.export_text()

    streamed = UsageRow("a", done=2, latencies_ms=[100.0, 200.0], first_chunks_ms=[40.0, 60.0])
    plain = UsageRow("b", done=1, latencies_ms=[50.0])
    assert "TTFT p50/p95" in text([streamed, plain]) and "40 ms/60 ms" in text([streamed, plain])
    assert "TTFT" not in text([plain])
