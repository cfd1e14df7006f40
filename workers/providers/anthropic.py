"""Anthropic Messages through the official SDK; the canonical request is translated both ways."""

from __future__ import annotations

import time
from typing import Any

import anthropic

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
            usage=Usage(
                # Anthropic's input_tokens leaves out cache reads and writes; ours counts all.
                input_tokens=billed.input_tokens + billed.cache_read_tokens + billed.cache_write_tokens,
                output_tokens=billed.output_tokens,
                cache_read_tokens=billed.cache_read_tokens,
                cache_write_tokens=billed.cache_write_tokens,
            ),
            http_status=raw.status_code,
            headers=rate_limit_headers(raw.headers),
            provider_request_id=raw.request_id,
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
