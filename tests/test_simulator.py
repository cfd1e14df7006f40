"""The provider simulator, driven through the official openai and anthropic SDKs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import anthropic
import openai
import pytest

from headrace.simulator.__main__ import build_parser, config_from_args
from headrace.simulator.answers import build_answer
from headrace.simulator.config import SimConfig
from headrace.simulator.faults import DirectiveError, parse_directives
from headrace.simulator.openai_dialect import go_duration
from headrace.simulator.tokens import count_prompt_tokens

if TYPE_CHECKING:
    from tests.simulator_fixture import SimControl


GPT = "gpt-4o-mini"
CLAUDE = "claude-sonnet-4-5"


def oai(sim: SimControl, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{sim.url}/v1", api_key=kwargs.pop("api_key", "sk-test"), max_retries=0, **kwargs
    )


def ant(sim: SimControl, **kwargs: Any) -> anthropic.Anthropic:
    key = kwargs.pop("api_key", "sk-ant-test")
    return anthropic.Anthropic(base_url=sim.url, api_key=key, max_retries=0, **kwargs)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def chat(client: openai.OpenAI, text: str = "Hello there", **kwargs: Any) -> Any:
    return client.chat.completions.create(model=kwargs.pop("model", GPT), messages=user(text), **kwargs)


def message(client: anthropic.Anthropic, text: str = "Hello there", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 100)
    return client.messages.create(model=kwargs.pop("model", CLAUDE), messages=user(text), **kwargs)


# --- successful calls -------------------------------------------------------------------------


def test_openai_returns_a_typed_deterministic_completion(sim: SimControl) -> None:
    client = oai(sim)
    first = chat(client, "Tell me about weirs", max_tokens=500)
    second = chat(client, "Tell me about weirs", max_tokens=500)
    other = chat(client, "Tell me about sluices", max_tokens=500)
    assert isinstance(first, openai.types.chat.ChatCompletion)
    assert first.id.startswith("chatcmpl-") and first.object == "chat.completion" and first.model == GPT
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "stop"
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content
    usage = first.usage
    assert usage is not None
    assert usage.prompt_tokens == count_prompt_tokens(user("Tell me about weirs"))
    assert 5 <= usage.completion_tokens <= 60
    assert len(first.choices[0].message.content.split()) == usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0


def test_openai_max_tokens_caps_with_length_and_stop_cuts_with_stop(sim: SimControl) -> None:
    client = oai(sim)
    full = chat(client, "A long answer please [[sim:output_tokens=30]]")
    assert full.usage.completion_tokens == 30 and full.choices[0].finish_reason == "stop"
    capped = chat(client, "A long answer please [[sim:output_tokens=30]]", max_completion_tokens=7)
    assert capped.choices[0].finish_reason == "length" and capped.usage.completion_tokens == 7
    assert full.choices[0].message.content.startswith(capped.choices[0].message.content)
    words = full.choices[0].message.content.split()
    cut = chat(client, "A long answer please [[sim:output_tokens=30]]", stop=[f" {words[3]} "])
    assert cut.choices[0].finish_reason == "stop"
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert cut.usage.completion_tokens < 30


def test_openai_raw_response_carries_rate_limit_headers(sim: SimControl) -> None:
    sim.configure(rpm=100, tpm=10_000)
    raw = oai(sim).chat.completions.with_raw_response.create(model=GPT, messages=user("hi"), max_tokens=50)
    completion = raw.parse()
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert raw.headers["x-ratelimit-limit-tokens"] == "10000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "99"
    # The max_tokens reservation is refunded down to the real output once the call ends.
    used = completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert 10_000 - used <= int(raw.headers["x-ratelimit-remaining-tokens"]) <= 10_000
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.headers["x-request-id"].startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0


def test_anthropic_returns_a_typed_message_with_system_stop_sequences_and_temperature(
    sim: SimControl,
) -> None:
    client = ant(sim)
    msg = message(client, system="You are terse.", stop_sequences=["\n\n"], extra_body={"temperature": 0.2})
    assert isinstance(msg, anthropic.types.Message)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == CLAUDE and msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.content[0].type == "text" and msg.content[0].text
    system_tokens = count_prompt_tokens(user("Hello there"), system="You are terse.")
    assert msg.usage.input_tokens == system_tokens
    assert msg.usage.output_tokens == len(msg.content[0].text.split())
    assert msg.usage.cache_read_input_tokens == 0 and msg.usage.cache_creation_input_tokens == 0
    listed = message(client, system=[{"type": "text", "text": "You are terse."}])
    assert listed.usage.input_tokens == system_tokens


def test_anthropic_stop_reasons_follow_max_tokens_and_stop_sequences(sim: SimControl) -> None:
    client = ant(sim)
    full = message(client, "[[sim:output_tokens=20]]")
    capped = message(client, "[[sim:output_tokens=20]]", max_tokens=4)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 4
    stop = f" {full.content[0].text.split()[2]} "
    cut = message(client, "[[sim:output_tokens=20]]", stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert full.content[0].text.startswith(cut.content[0].text)


def test_anthropic_raw_response_carries_rate_limit_headers(sim: SimControl) -> None:
    sim.configure(anthropic_rpm=50, itpm=20_000, otpm=8_000)
    raw = ant(sim).messages.with_raw_response.create(model=CLAUDE, max_tokens=100, messages=user("hi"))
    msg = raw.parse()
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert raw.headers["anthropic-ratelimit-requests-remaining"] == "49"
    assert raw.headers["anthropic-ratelimit-input-tokens-limit"] == "20000"
    assert raw.headers["anthropic-ratelimit-output-tokens-limit"] == "8000"
    assert 8000 - msg.usage.output_tokens <= int(raw.headers["anthropic-ratelimit-output-tokens-remaining"])
    assert raw.headers["anthropic-ratelimit-tokens-limit"] == "8000"  # the most restrictive one
    assert raw.headers["anthropic-ratelimit-requests-reset"].endswith("Z")


# --- rate limits ------------------------------------------------------------------------------


def test_openai_tpm_429_advertises_a_wait_after_which_the_call_succeeds(sim: SimControl) -> None:
    sim.configure(tpm=30_000)  # refills 500 tokens/s
    client = oai(sim)
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(400):
            chat(client, "[[sim:output_tokens=200]]", max_tokens=200)
    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.type == "tokens"
    assert "on tokens per min (TPM): Limit 30000" in error.message
    wait_ms = int(error.response.headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert int(error.response.headers["retry-after"]) == -(-wait_ms // 1000)
    assert error.response.headers["x-ratelimit-limit-tokens"] == "30000"
    time.sleep(wait_ms / 1000)
    assert chat(client, "[[sim:output_tokens=200]]", max_tokens=200).usage.completion_tokens == 200


def test_openai_rpm_429_has_type_requests(sim: SimControl) -> None:
    sim.configure(rpm=3)
    client = oai(sim)
    for _ in range(3):
        chat(client)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client)
    assert caught.value.type == "requests" and "requests per min (RPM): Limit 3" in caught.value.message
    assert caught.value.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_openai_request_larger_than_tpm_is_refused_without_retry_after(sim: SimControl) -> None:
    sim.configure(tpm=1000)
    with pytest.raises(openai.RateLimitError) as caught:
        chat(oai(sim), max_tokens=5000)
    assert caught.value.message.startswith("Error code: 429 - Request too large")
    assert "retry-after" not in caught.value.response.headers


def test_anthropic_otpm_429_has_retry_after_and_refills_continuously(sim: SimControl) -> None:
    sim.configure(otpm=6_000)  # refills 100 output tokens/s
    client = ant(sim)
    with pytest.raises(anthropic.RateLimitError) as caught:
        for _ in range(200):
            message(client, "[[sim:output_tokens=50]]", max_tokens=50)
    error = caught.value
    assert error.body["type"] == "error"
    assert error.body["error"]["type"] == "rate_limit_error"
    assert "6,000 output tokens per minute" in error.body["error"]["message"]
    assert error.body["request_id"] == error.response.headers["request-id"]
    retry_after = int(error.response.headers["retry-after"])
    assert retry_after == 1
    time.sleep(retry_after)
    assert message(client, "[[sim:output_tokens=50]]", max_tokens=50).usage.output_tokens == 50


def test_anthropic_reserves_max_tokens_up_front(sim: SimControl) -> None:
    sim.configure(otpm=1_000)
    client = ant(sim)
    message(client, max_tokens=900)  # reserves 900, then settles to the short real answer
    message(client, max_tokens=900)
    with pytest.raises(anthropic.RateLimitError):
        message(client, max_tokens=1001)  # larger than the whole bucket: can never fit


def test_anthropic_otpm_may_count_only_the_output_produced(sim: SimControl) -> None:
    """otpm_counts = "output": a provider counting output as generated takes a short answer's
    real length, whatever its max_tokens (bench/short_answers.py)."""
    sim.configure(otpm=1_000, otpm_counts="output")
    client = ant(sim)
    for _ in range(3):
        assert message(client, "[[sim:output_tokens=300]]", max_tokens=4096).usage.output_tokens == 300
    with pytest.raises(anthropic.RateLimitError):
        message(client, "[[sim:output_tokens=300]]", max_tokens=4096)  # 900 taken, 300 more do not fit


def test_buckets_are_separate_per_api_key_and_model(sim: SimControl) -> None:
    sim.configure(rpm=1)
    chat(oai(sim, api_key="sk-a"))
    with pytest.raises(openai.RateLimitError):
        chat(oai(sim, api_key="sk-a"))
    chat(oai(sim, api_key="sk-b"))
    chat(oai(sim, api_key="sk-a"), model="gpt-4o")


def test_a_lowered_limit_applies_to_existing_buckets(sim: SimControl) -> None:
    client = oai(sim)
    chat(client)
    sim.configure(rpm=1)
    chat(client)
    with pytest.raises(openai.RateLimitError):
        chat(client)
    sim.configure(rpm=None)
    chat(client)


# --- faults and directives --------------------------------------------------------------------


def test_status_directives_raise_the_matching_sdk_errors(sim: SimControl) -> None:
    with pytest.raises(openai.InternalServerError) as server_error:
        chat(oai(sim), "boom [[sim:status=500]]")
    assert server_error.value.type == "server_error" and server_error.value.status_code == 500
    with pytest.raises(openai.BadRequestError) as bad:
        chat(oai(sim), "[[sim:status=400]]")
    assert bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        chat(oai(sim), "[[sim:status=404]]")
    assert missing.value.code == "model_not_found"
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        message(ant(sim), "[[sim:status=529]]")
    assert overloaded.value.body["error"]["type"] == "overloaded_error"
    with pytest.raises(anthropic.BadRequestError):
        message(ant(sim), "[[sim:status=400]]")
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        message(ant(sim), "[[sim:status=403]]")
    assert denied.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.InternalServerError) as api_error:
        message(ant(sim), "[[sim:status=500]]")
    assert api_error.value.body["error"]["type"] == "api_error"


def test_context_length_directive(sim: SimControl) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        chat(oai(sim), "[[sim:error=context_length]]")
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    with pytest.raises(anthropic.BadRequestError) as anthropic_caught:
        message(ant(sim), "[[sim:error=context_length]]")
    assert anthropic_caught.value.body["error"]["message"].startswith("prompt is too long")


def test_429_directive_sends_the_requested_retry_after(sim: SimControl) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        chat(oai(sim), "[[sim:status=429,retry_after=2.5]]")
    assert caught.value.response.headers["retry-after-ms"] == "2500"
    assert caught.value.response.headers["retry-after"] == "3"
    with pytest.raises(anthropic.RateLimitError) as anthropic_caught:
        message(ant(sim), "[[sim:status=429]] [[sim:retry_after=7]]")
    assert anthropic_caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize(("raw", "sent"), [("soon", "soon"), ("", ""), ("Wed%2C%2099%20Foo", "Wed, 99 Foo")])
def test_raw_retry_after_directive_sends_the_header_verbatim(sim: SimControl, raw: str, sent: str) -> None:
    """retry_after_raw sets retry-after to any text, percent-decoded, in both dialects: the
    garbage a client must survive."""
    with pytest.raises(openai.RateLimitError) as caught:
        chat(oai(sim), f"[[sim:status=429,retry_after_raw={raw}]]")
    assert caught.value.response.headers["retry-after"] == sent
    assert "retry-after-ms" not in caught.value.response.headers
    with pytest.raises(anthropic.RateLimitError) as anthropic_caught:
        message(ant(sim), f"[[sim:status=429]] [[sim:retry_after_raw={raw}]]")
    assert anthropic_caught.value.response.headers["retry-after"] == sent


def test_hang_times_out_the_client_and_stops_when_it_leaves(sim: SimControl) -> None:
    with pytest.raises(openai.APITimeoutError):
        chat(oai(sim), "[[sim:hang]]", timeout=0.5)
    with pytest.raises(anthropic.APITimeoutError):
        message(ant(sim, timeout=0.5), "[[sim:hang]]")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        stats = sim.stats()
        if stats["answered"].get("openai", {}).get("499") and stats["answered"].get("anthropic", {}).get(
            "499"
        ):
            break
        time.sleep(0.05)
    assert stats["outcomes"]["openai"]["client_closed"] == 1
    assert stats["in_flight"] == {"openai": 0, "anthropic": 0}


def test_a_short_hang_answers_504(sim: SimControl) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        message(ant(sim), "[[sim:hang=0.2]]")
    assert caught.value.status_code == 504 and caught.value.body["error"]["type"] == "timeout_error"


def test_latency_directive_delays_the_answer(sim: SimControl) -> None:
    started = time.monotonic()
    chat(oai(sim), "[[sim:latency_ms=300]]")
    assert time.monotonic() - started >= 0.3


def test_fault_rate_one_fails_every_call_with_the_chosen_fault(sim: SimControl) -> None:
    sim.configure(fault_rate=1.0, faults=["503"])
    for _ in range(5):
        with pytest.raises(openai.InternalServerError) as caught:
            chat(oai(sim))
        assert caught.value.status_code == 503
        with pytest.raises(anthropic.InternalServerError) as anthropic_caught:
            message(ant(sim))
        assert anthropic_caught.value.status_code == 503
    sim.configure(fault_rate=0.0)
    chat(oai(sim))


def test_faults_vary_per_call_and_repeat_per_seed(sim: SimControl) -> None:
    def outcomes() -> list[int]:
        seen = []
        for _ in range(30):
            try:
                chat(oai(sim))
                seen.append(200)
            except openai.APIStatusError as error:
                seen.append(error.status_code)
        return seen

    sim.configure(fault_rate=0.5, faults=["500", "529"], seed=7)
    first = outcomes()
    sim.reset()
    assert outcomes() == first
    assert {200, 500, 529} <= set(first)


def test_a_fault_still_counts_against_rpm(sim: SimControl) -> None:
    sim.configure(rpm=2)
    with pytest.raises(openai.InternalServerError):
        chat(oai(sim), "[[sim:status=500]]")
    chat(oai(sim))
    with pytest.raises(openai.RateLimitError):
        chat(oai(sim))


# --- auth and malformed requests --------------------------------------------------------------


def test_missing_key_is_401_in_each_dialect(sim: SimControl) -> None:
    body = {"model": GPT, "messages": user("hi")}
    response = sim.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["x-request-id"]
    response = sim.http.post(
        "/v1/messages", json={**body, "max_tokens": 10}, headers={"anthropic-version": "x"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    sim.configure(require_api_key=False)
    assert sim.http.post("/v1/chat/completions", json=body).status_code == 200


def test_anthropic_accepts_x_api_key_and_requires_a_version_header(sim: SimControl) -> None:
    body = {"model": CLAUDE, "max_tokens": 10, "messages": user("hi")}
    ok = sim.http.post(
        "/v1/messages", json=body, headers={"x-api-key": "k", "anthropic-version": "2023-06-01"}
    )
    assert ok.status_code == 200 and ok.json()["type"] == "message"
    missing = sim.http.post("/v1/messages", json=body, headers={"x-api-key": "k"})
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"[]",
        b'{"model": "gpt-4o-mini"}',
        b'{"model": "gpt-4o-mini", "messages": []}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": 2}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "stop": 5}',
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "[[sim:nonsense]]"}]}',
    ],
)
def test_malformed_openai_requests_are_400_with_an_openai_body(sim: SimControl, payload: bytes) -> None:
    headers = {"authorization": "Bearer sk-test", "content-type": "application/json"}
    response = sim.http.post("/v1/chat/completions", content=payload, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"model": "claude", "messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "claude", "max_tokens": 5}',
        b'{"model": "claude", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}',
        b'{"model": "claude", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "system": 3}',
        b'{"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
    ],
)
def test_malformed_anthropic_requests_are_400_with_an_anthropic_body(sim: SimControl, payload: bytes) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "content-type": "application/json"}
    response = sim.http.post("/v1/messages", content=payload, headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["request_id"] == response.headers["request-id"]


def test_unknown_paths_are_404_in_the_callers_dialect(sim: SimControl) -> None:
    with pytest.raises(openai.NotFoundError):
        oai(sim).models.list()
    response = sim.http.get("/v1/messages/nope", headers={"anthropic-version": "x"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


def test_control_plane_rejects_bad_config(sim: SimControl) -> None:
    assert sim.http.post("/_sim/config", json={"rpmm": 3}).status_code == 400
    assert sim.http.post("/_sim/config", json={"fault_rate": 2}).status_code == 400
    assert sim.http.post("/_sim/config", json={"faults": ["418"]}).status_code == 400
    assert sim.http.get("/_sim/health").json() == {"status": "ok"}
    assert sim.http.get("/_sim/config").json()["latency_ms"] == 1.0


# --- stats and concurrency --------------------------------------------------------------------


def test_stats_count_what_was_sent(sim: SimControl) -> None:
    sim.configure(rpm=3)
    for _ in range(4):
        with contextlib.suppress(openai.RateLimitError):
            chat(oai(sim), max_tokens=40)
    message(ant(sim), max_tokens=30)
    with pytest.raises(anthropic.InternalServerError):
        message(ant(sim), "[[sim:status=500]]")
    stats = sim.stats()
    assert stats["received"] == {"openai": 4, "anthropic": 2}
    assert stats["answered"] == {"openai": {"200": 3, "429": 1}, "anthropic": {"200": 1, "500": 1}}
    assert stats["admitted"]["openai"]["requests"] == 3
    assert stats["admitted"]["openai"]["reserved_tokens"] == 120
    assert stats["admitted"]["anthropic"]["requests"] == 2
    assert len(stats["records"]) == 6 and stats["records_dropped"] == 0
    assert [r["status"] for r in stats["records"][:4]] == [200, 200, 200, 429]
    peak = next(p for p in stats["peak_60s"] if p["dialect"] == "openai")
    assert peak["requests"] == 3
    assert sum(w["requests"] for w in stats["per_second"] if w["dialect"] == "openai") == 3
    assert len(sim.stats(records=2)["records"]) == 2
    sim.reset()
    assert sim.stats()["received"] == {}


def test_hundreds_of_concurrent_calls_overlap(sim: SimControl) -> None:
    sim.configure(latency_ms=500)
    port = int(sim.url.rsplit(":", 1)[1])
    body = json.dumps({"model": GPT, "messages": user("hi")}).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-test\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    ) % (len(body), body)

    # Raw sockets: httpx's own connection set-up would dominate the timing being measured.
    async def call() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        answer = await reader.read()
        writer.close()
        return answer.split(b"\r\n", 1)[0]

    async def fire() -> tuple[list[bytes], float]:
        started = time.monotonic()
        status_lines = await asyncio.gather(*(call() for _ in range(300)))
        return list(status_lines), time.monotonic() - started

    status_lines, elapsed_s = asyncio.run(fire())
    assert status_lines == [b"HTTP/1.1 200 OK"] * 300
    assert elapsed_s < 3.0  # 300 x 0.5 s one after another would be 150 s


# --- pure helpers -----------------------------------------------------------------------------


def test_prompt_tokens_are_counted_like_a_bpe_tokenizer_splits_words() -> None:
    assert count_prompt_tokens([{"role": "user", "content": "abcdefgh"}]) == 3 + 4 + 1
    assert count_prompt_tokens([{"role": "user", "content": "abcdefghi"}]) == 3 + 4 + 2
    assert count_prompt_tokens([{"role": "user", "content": "The mill, 1848."}]) == 3 + 4 + 6
    parts = [{"type": "text", "text": "abcd"}, {"type": "image_url", "image_url": {"url": "data:..."}}]
    assert count_prompt_tokens([{"role": "user", "content": parts}]) == 3 + 4 + 1 + 85
    assert count_prompt_tokens(user("abcd"), system="abcd") == 3 + 4 + 1 + 4 + 1
    assert count_prompt_tokens([{"role": "assistant", "content": None}, "odd"]) > 0  # type: ignore[list-item]


def test_go_durations_look_like_openais() -> None:
    assert [go_duration(s) for s in (0, 0.012, 1.0, 17.28, 90.5, 360, 3723)] == [
        "0s",
        "12ms",
        "1s",
        "17.28s",
        "1m30.5s",
        "6m0s",
        "1h2m3s",
    ]


def test_directive_parsing() -> None:
    parsed = parse_directives("x [[sim:status=429, retry_after=1.5]] y [[sim:hang]]")
    assert parsed.status == 429 and parsed.retry_after_s == 1.5 and parsed.hang and parsed.hang_s is None
    assert parse_directives("no directives here").forces_outcome is False
    for bad in (
        "[[sim:status=200]]",
        "[[sim:stauts=500]]",
        "[[sim:error=other]]",
        "[[sim:latency_ms=x]]",
        "[[sim:retry_after_raw]]",  # no value at all (an empty one is retry_after_raw=)
        "[[sim:retry_after_raw=a%0D%0Ab]]",  # a header value cannot hold a line break
        "[[sim:retry_after=1,retry_after_raw=soon]]",
    ):
        with pytest.raises(DirectiveError):
            parse_directives(bad)
    assert parse_directives("[[sim:status=429,retry_after_raw=]]").retry_after_raw == ""


def test_answers_are_prefixes_under_a_cap() -> None:
    common = {"seed": 1, "model": "m", "prompt": ["p"], "min_tokens": 5, "max_tokens": 60, "stops": ()}
    full = build_answer(**common, forced_tokens=None, cap_tokens=None)
    capped = build_answer(**common, forced_tokens=None, cap_tokens=3)
    assert full.finish == "end" and capped.finish == "length" and capped.output_tokens == 3
    assert full.text.startswith(capped.text)


def test_cli_flags_cover_the_config() -> None:
    args = build_parser().parse_args(
        [
            *("--port", "9200", "--config-json", '{"rpm": 5, "seed": 3}', "--rpm", "none", "--tpm", "1000"),
            *("--faults", "500,hang", "--fault-rate", "0.1", "--no-require-api-key", "--otpm", "7"),
            *("--limiter", "rolling", "--window-s", "30", "--sub-window-s", "5"),
        ]
    )
    config = config_from_args(args)
    assert args.port == 9200
    assert config == SimConfig(
        seed=3,
        tpm=1000,
        faults=["500", "hang"],
        fault_rate=0.1,
        require_api_key=False,
        otpm=7,
        limiter="rolling",
        window_s=30,
        sub_window_s=5,
    )
