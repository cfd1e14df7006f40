"""Anthropic Messages through the official SDK; the canonical request is translated both ways.

A deployment with ``stream = true`` is called through ``client.messages.stream``; the SDK
accumulates the events into the Message (``get_final_message``), which is translated as an
unstreamed reply is, so a result line does not show how it was fetched.
"""

from __future__ import annotations

import time
from typing import Any

import anthropic
import httpx2

from workers.providers.anthropic_translate import chat_to_messages, message_to_chat, usage_from_message
from workers.providers.base import (
    CallFailed,
    ClientCache,
    ProviderCall,
    ProviderReply,
    TranslationError,
    Usage,
    reached_provider,
)
from workers.providers.headers import rate_limit_headers, retry_after_s


class AnthropicAdapter:
    name = "anthropic"

    def __init__(self) -> None:
        self._clients = ClientCache(_build_client)

    def complete(self, call: ProviderCall) -> ProviderReply:
        try:
            wire = chat_to_messages(
                call.body, model=call.deployment.model, default_max_tokens=call.default_max_tokens
            )
        except TranslationError as exc:
            raise CallFailed(str(exc), kind="translation") from exc
        client = self._clients.get(call)
        required = {k: wire.pop(k) for k in ("model", "max_tokens", "messages")}
        if call.deployment.stream:
            return _streamed(client, call, required, wire)
        try:
            raw = client.messages.with_raw_response.create(
                **required,
                extra_body=wire,  # system, stop_sequences, temperature...: sent as the wire has them
                extra_headers=call.headers(),
                # An explicit timeout also stops the SDK refusing large max_tokens without streaming.
                timeout=anthropic.Timeout(call.timeout_s, connect=call.connect_timeout_s),
            )
            message: dict[str, Any] = raw.http_response.json()
            body = message_to_chat(message, created=int(time.time()))
            billed = usage_from_message(message)
        except anthropic.APIStatusError as exc:
            raise _status_failure(exc) from exc
        except anthropic.APITimeoutError as exc:
            raise CallFailed(f"timed out: {exc}", kind="timeout", sent=reached_provider(exc)) from exc
        except anthropic.APIConnectionError as exc:
            raise CallFailed(
                f"connection failed: {exc}", kind="connection", sent=reached_provider(exc)
            ) from exc
        except ValueError as exc:
            raise CallFailed(f"unreadable reply: {exc}", kind="invalid_reply") from exc
        return ProviderReply(
            body=body,
            usage=_usage(billed),
            http_status=raw.status_code,
            headers=rate_limit_headers(raw.headers),
            provider_request_id=raw.request_id,
        )


def _streamed(
    client: anthropic.Anthropic, call: ProviderCall, required: dict[str, Any], wire: dict[str, Any]
) -> ProviderReply:
    """The call streamed: errors before the first event are the provider's status; a stream that
    breaks after its 200 (dropped, timed out, or an error event) is a connection failure."""
    sent = time.monotonic()
    first_chunk_s, chunks = None, 0
    try:
        with client.messages.stream(
            **required,
            extra_body=wire,
            extra_headers=call.headers(),
            timeout=anthropic.Timeout(call.timeout_s, connect=call.connect_timeout_s),
        ) as stream:
            try:
                for event in stream:
                    elapsed_s = time.monotonic() - sent
                    if event.type == "content_block_delta":
                        chunks += 1
                        first_chunk_s = elapsed_s if first_chunk_s is None else first_chunk_s
                    if elapsed_s > call.timeout_s:
                        raise CallFailed(f"stream still running after {call.timeout_s:g} s", kind="timeout")
                final = stream.get_final_message()
            except (anthropic.APITimeoutError, httpx2.TimeoutException) as exc:
                raise CallFailed(f"stream timed out: {exc}", kind="timeout") from exc
            except (anthropic.APIError, httpx2.HTTPError) as exc:
                raise CallFailed(f"stream broke: {exc}", kind="connection") from exc
            if final.stop_reason is None:
                raise CallFailed("stream ended before its message_delta", kind="connection")
            message: dict[str, Any] = final.to_dict()
            body = message_to_chat(message, created=int(time.time()))
            reply = ProviderReply(
                body=body,
                usage=_usage(usage_from_message(message)),
                http_status=stream.response.status_code,
                headers=rate_limit_headers(stream.response.headers),
                provider_request_id=stream.request_id,
                first_chunk_s=first_chunk_s,
                chunks=chunks,
            )
    except anthropic.APIStatusError as exc:
        raise _status_failure(exc) from exc
    except anthropic.APITimeoutError as exc:
        raise CallFailed(f"timed out: {exc}", kind="timeout", sent=reached_provider(exc)) from exc
    except anthropic.APIConnectionError as exc:
        raise CallFailed(f"connection failed: {exc}", kind="connection", sent=reached_provider(exc)) from exc
    except ValueError as exc:  # a tool's input that is not JSON, a Message we cannot read
        raise CallFailed(f"unreadable reply: {exc}", kind="invalid_reply") from exc
    return reply


def _usage(billed: Usage) -> Usage:
    # Anthropic's input_tokens leaves out cache reads and writes; ours counts all.
    return Usage(
        input_tokens=billed.input_tokens + billed.cache_read_tokens + billed.cache_write_tokens,
        output_tokens=billed.output_tokens,
        cache_read_tokens=billed.cache_read_tokens,
        cache_write_tokens=billed.cache_write_tokens,
    )


def _build_client(call: ProviderCall, api_key: str) -> anthropic.Anthropic:
    # Retries off: anthropic 2.x would otherwise sleep any retry-after inside our slot. No timeout
    # here: each call passes its own (ClientCache keys clients on endpoint and key only).
    return anthropic.Anthropic(api_key=api_key, base_url=call.deployment.base_url, max_retries=0)


def _status_failure(exc: anthropic.APIStatusError) -> CallFailed:
    headers = dict(exc.response.headers)
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
    inner: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else {}
    message = inner.get("message")
    error_type = inner.get("type")
    return CallFailed(
        message if isinstance(message, str) else str(exc),
        kind="status",
        status=exc.status_code,
        error_type=error_type if isinstance(error_type, str) else None,
        retry_after_s=retry_after_s(headers),
        headers=rate_limit_headers(headers),
        provider_request_id=exc.request_id,
    )
