"""OpenAI Chat Completions, and any OpenAI-compatible endpoint given as ``base_url``.

A deployment with ``stream = true`` is called with ``stream=True`` and
``stream_options={"include_usage": True}``; its chunks are assembled into the ``chat.completion``
object the same call answers unstreamed (content, refusal, tool calls, finish reason, usage, as
the provider sent them), so a result line does not show how it was fetched.
"""

from __future__ import annotations

import time
from typing import Any

import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk
from pydantic import ValidationError

from workers.providers.anthropic_parts import without_anthropic_parts
from workers.providers.base import (
    CallFailed,
    ClientCache,
    ProviderCall,
    ProviderReply,
    Usage,
    reached_provider,
    requested_max_tokens,
)
from workers.providers.headers import rate_limit_headers, retry_after_s

# Keys sent as typed arguments; everything else in the canonical body rides in extra_body, so
# fields this SDK version does not know yet still reach the endpoint unchanged.
_TYPED = ("model", "messages")
# Hosts that are OpenAI's own API (Azure OpenAI included), where the cap is max_completion_tokens.
_OPENAI_HOSTS = ("api.openai.com",)
_OPENAI_HOST_SUFFIXES = (".openai.azure.com",)


class OpenAIAdapter:
    name = "openai"

    def __init__(self) -> None:
        self._clients = ClientCache(_build_client)

    def complete(self, call: ProviderCall) -> ProviderReply:
        client = self._clients.get(call)
        # cache_control and thinking are Anthropic's: OpenAI answers 400 to fields it does not know.
        request = without_anthropic_parts(call.body)
        extra = {k: v for k, v in request.items() if k not in _TYPED}
        if requested_max_tokens(call.body, 0) == 0:
            # Admission reserved this cap for an uncapped request (workers.admission.estimate_call);
            # sent, it bounds the output to what was reserved instead of the model's own maximum.
            extra[output_cap_field(client.base_url.host)] = call.default_max_tokens
        timeout = openai.Timeout(call.timeout_s, connect=call.connect_timeout_s)
        try:
            if call.deployment.stream:
                return _streamed(client, call, request["messages"], extra, timeout)
            raw = client.chat.completions.with_raw_response.create(
                model=call.deployment.model,
                messages=request["messages"],
                extra_body=extra,
                extra_headers=call.headers(),
                # Per call, not per client: the pipeline clips it to the request's deadline.
                timeout=timeout,
            )
            completion = raw.parse()
            # Keep the provider's own JSON, not a re-serialisation: fields the SDK does not
            # model yet survive, and the result line is what the provider said.
            body: dict[str, Any] = raw.http_response.json()
        except openai.APIStatusError as exc:
            raise _status_failure(exc) from exc
        except openai.APITimeoutError as exc:
            raise CallFailed(f"timed out: {exc}", kind="timeout", sent=reached_provider(exc)) from exc
        except openai.APIConnectionError as exc:
            raise CallFailed(
                f"connection failed: {exc}", kind="connection", sent=reached_provider(exc)
            ) from exc
        except (openai.APIResponseValidationError, ValidationError, ValueError) as exc:
            raise CallFailed(f"unreadable reply: {exc}", kind="invalid_reply") from exc
        except openai.APIError as exc:  # an error event inside a stream, after its 200
            raise CallFailed(f"stream broke: {exc.message}", kind="connection", error_type=exc.type) from exc
        return ProviderReply(
            body=body,
            usage=_usage(completion.usage),
            http_status=raw.status_code,
            headers=rate_limit_headers(raw.headers),
            provider_request_id=raw.request_id,
        )


def _streamed(
    client: openai.OpenAI,
    call: ProviderCall,
    messages: Any,
    extra: dict[str, Any],
    timeout: openai.Timeout,
) -> ProviderReply:
    """The call streamed. The SDK raises a status error before the first chunk; a stream that
    breaks after it raises APIConnectionError, APITimeoutError or (an error event) APIError."""
    extra = {k: v for k, v in extra.items() if k not in ("stream", "stream_options")}
    sent = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=call.deployment.model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        extra_headers=call.headers(),
        timeout=timeout,  # between two chunks; the whole stream is held to call.timeout_s below
    )
    assembly = ChunkAssembly()
    first_chunk_s = None
    with raw.parse() as stream:
        for chunk in stream:
            elapsed_s = time.monotonic() - sent
            if assembly.add(chunk) and first_chunk_s is None:
                first_chunk_s = elapsed_s
            if elapsed_s > call.timeout_s:
                raise CallFailed(f"stream still running after {call.timeout_s:g} s", kind="timeout")
    if assembly.finish_reason is None:
        raise CallFailed("stream ended before its finish_reason", kind="connection")
    body = assembly.body()
    return ProviderReply(
        body=body,
        usage=_usage(assembly.usage),
        http_status=raw.status_code,
        headers=rate_limit_headers(raw.headers),
        provider_request_id=raw.request_id,
        first_chunk_s=first_chunk_s,
        chunks=assembly.chunks,
    )


class ChunkAssembly:
    """chat.completion.chunk objects in, the chat.completion they make out (choice 0: n is 1)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.role = "assistant"
        self.texts: list[str] | None = None
        self.refusals: list[str] | None = None
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: CompletionUsage | None = None
        self.chunks = 0  # chunks that carried output

    def add(self, chunk: ChatCompletionChunk) -> bool:
        """Take one chunk in; whether it carried output (text, refusal or a tool call's piece)."""
        if not self.head:
            self.head = {
                "id": chunk.id,
                "object": "chat.completion",
                "created": chunk.created,
                "model": chunk.model,
            }
            if chunk.service_tier is not None:
                self.head["service_tier"] = chunk.service_tier
            if chunk.system_fingerprint is not None:
                self.head["system_fingerprint"] = chunk.system_fingerprint
        if chunk.usage is not None:
            self.usage = chunk.usage
        output = False
        for choice in chunk.choices:
            if choice.index != 0:
                continue
            delta = choice.delta
            if delta.role:
                self.role = delta.role
            if delta.content is not None:
                self.texts = [*(self.texts or ()), delta.content]
                output = output or bool(delta.content)
            if delta.refusal is not None:
                self.refusals = [*(self.refusals or ()), delta.refusal]
                output = output or bool(delta.refusal)
            for piece in delta.tool_calls or ():
                call = self.tool_calls.setdefault(
                    piece.index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                )
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["function"]["name"] += piece.function.name or ""
                    call["function"]["arguments"] += piece.function.arguments or ""
                output = True
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
        self.chunks += output
        return output

    def body(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role,
            "content": None if self.texts is None else "".join(self.texts),
            "refusal": None if self.refusals is None else "".join(self.refusals),
        }
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[index] for index in sorted(self.tool_calls)]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
        usage = None if self.usage is None else self.usage.to_dict()
        return {**self.head, "choices": [choice], "usage": usage}


def _usage(usage: CompletionUsage | None) -> Usage:
    if usage is None:
        raise CallFailed("reply has no usage", kind="invalid_reply")
    details = usage.prompt_tokens_details
    cached = details.cached_tokens if details else None
    # Sent by endpoints that bill cache writes (Anthropic's models behind an OpenAI-compatible API).
    written = details.cache_write_tokens if details else None
    return Usage(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cache_read_tokens=cached or 0,
        cache_write_tokens=written or 0,
    )


def output_cap_field(host: str) -> str:
    """The field that caps the output, for an endpoint's host.

    OpenAI's own API documents ``max_tokens`` as deprecated and rejects it (400
    unsupported_parameter) on o-series and newer models, so it gets ``max_completion_tokens``.
    OpenAI-compatible servers (vLLM, llama.cpp, Ollama, gateways) all read ``max_tokens``, while
    some reject ``max_completion_tokens`` as an unknown field or silently ignore it, which would
    leave the output uncapped: they get ``max_tokens``.
    """
    host = host.lower()
    if host in _OPENAI_HOSTS or host.endswith(_OPENAI_HOST_SUFFIXES):
        return "max_completion_tokens"
    return "max_tokens"


def _build_client(call: ProviderCall, api_key: str) -> openai.OpenAI:
    # No timeout here: each call passes its own (ClientCache keys clients on endpoint and key only).
    return openai.OpenAI(
        api_key=api_key,
        base_url=call.deployment.base_url,
        max_retries=0,  # our policy owns every retry, so every attempt is seen and costed
    )


def _status_failure(exc: openai.APIStatusError) -> CallFailed:
    headers = dict(exc.response.headers)
    return CallFailed(
        exc.message,
        kind="status",
        status=exc.status_code,
        error_type=exc.type,
        error_code=exc.code if isinstance(exc.code, str) else None,
        retry_after_s=retry_after_s(headers),
        headers=rate_limit_headers(headers),
        provider_request_id=exc.request_id,
    )
