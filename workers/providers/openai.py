"""OpenAI Chat Completions, and any OpenAI-compatible endpoint given as ``base_url``."""

from __future__ import annotations

from typing import Any

import openai
from pydantic import ValidationError

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
        extra = {k: v for k, v in call.body.items() if k not in _TYPED}
        if requested_max_tokens(call.body, 0) == 0:
            # Admission reserved this cap for an uncapped request (workers.admission.estimate_call);
            # sent, it bounds the output to what was reserved instead of the model's own maximum.
            extra[output_cap_field(client.base_url.host)] = call.default_max_tokens
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=call.deployment.model,
                messages=call.body["messages"],
                extra_body=extra,
                extra_headers=call.headers(),
                # Per call, not per client: the pipeline clips it to the request's deadline.
                timeout=openai.Timeout(call.timeout_s, connect=call.connect_timeout_s),
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
        usage = completion.usage
        if usage is None:
            raise CallFailed("reply has no usage", kind="invalid_reply")
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else None
        return ProviderReply(
            body=body,
            usage=Usage(
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.completion_tokens,
                cache_read_tokens=cached or 0,
            ),
            http_status=raw.status_code,
            headers=rate_limit_headers(raw.headers),
            provider_request_id=raw.request_id,
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
