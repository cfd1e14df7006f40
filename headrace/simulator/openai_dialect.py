"""OpenAI Chat Completions: request validation, bodies, errors and x-ratelimit-* headers."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from typing import Any

from headrace.simulator.answers import Answer
from headrace.simulator.buckets import BucketState, Denial
from headrace.simulator.config import SimConfig
from headrace.simulator.dialect import (
    CallSpec,
    FieldError,
    SimError,
    bearer_or_api_key,
    check_number,
    positive_int,
    string_list,
    text_of_last_user_message,
)
from headrace.simulator.prompt_cache import OPENAI_STEP_TOKENS, CacheUse, PromptCache, openai_points
from headrace.simulator.streams import openai_sends
from headrace.simulator.tokens import count_prompt_tokens

CONTEXT_WINDOW_TOKENS = 128_000
_LIMITS_URL = "Visit https://platform.openai.com/account/rate-limits to learn more."
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload.)"
)
_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that! You can retry your request."
)
# status -> (type, code, message); {model} is filled in when the request named one.
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: (
        "invalid_request_error",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported.",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    413: ("invalid_request_error", None, "Request too large (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for {model} (simulated)."),
    500: ("server_error", None, _SERVER_ERROR),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout: the request took too long to complete."),
    529: ("server_error", None, "The server is overloaded (simulated 529)."),
}
_BUCKET_WORDS = {"requests": ("requests", "RPM"), "tokens": ("tokens", "TPM")}


def go_duration(seconds: float) -> str:
    """A Go-style duration as OpenAI writes it: 12ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds < 1:
        millis = round(seconds * 1000)
        return f"{millis}ms" if millis else "0s"
    if seconds < 60:
        return f"{_trim(seconds)}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    head = f"{int(hours)}h" if hours else ""
    return f"{head}{int(minutes)}m{_trim(secs)}s"


def _trim(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def _forced_tool(payload: Mapping[str, Any]) -> str | None:
    """The function a request forces a call to: tool_choice "required" (the first tool) or one
    named; None when the model may answer in words."""
    tools = payload.get("tools")
    choice = payload.get("tool_choice")
    if not isinstance(tools, list) or not tools:
        return None
    if choice == "required":
        first = tools[0]
        function = first.get("function") if isinstance(first, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        return name if isinstance(name, str) else None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        return name if isinstance(name, str) else None
    return None


def _anthropic_field(payload: Mapping[str, Any]) -> str | None:
    """The path of an Anthropic-only field (cache_control, thinking) in a Chat request, if any."""
    for key in ("thinking", "cache_control"):
        if key in payload:
            return key
    for i, tool in enumerate(payload.get("tools") or []):
        if isinstance(tool, dict) and "cache_control" in tool:
            return f"tools[{i}].cache_control"
    for i, message in enumerate(payload.get("messages") or []):
        if "thinking_blocks" in message:
            return f"messages[{i}].thinking_blocks"
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and "cache_control" in part:
                return f"messages[{i}].content[{j}].cache_control"
    return None


class OpenAIDialect:
    name = "openai"
    output_bucket = "tokens"
    cache_free_bucket: str | None = None  # cached prompt tokens count against TPM

    def new_request_id(self) -> str:
        return f"req_{uuid.uuid4().hex}"

    def authenticate(self, headers: Mapping[str, str], require_key: bool) -> str:
        key = bearer_or_api_key(headers, allow_x_api_key=False)
        if require_key and not key:
            raise SimError(401, _NO_KEY, "invalid_request_error")
        return key

    def parse(self, payload: Any) -> CallSpec:
        try:
            return self._parse(payload)
        except FieldError as error:
            raise self.invalid(error.message, error.param) from None

    def _parse(self, payload: Any) -> CallSpec:
        if not isinstance(payload, dict):
            raise self.invalid(_BAD_JSON)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise self.invalid("you must provide a model parameter", "model")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise self.invalid("'messages' must be a non-empty array of message objects.", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise self.invalid(f"Invalid message at messages[{index}]: a role is required.", "messages")
        stream = payload.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise self.invalid("stream: expected a boolean", "stream")
        options = payload.get("stream_options")
        if options is not None and not stream:
            raise self.invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options"
            )
        if options is not None and not isinstance(options, dict):
            raise self.invalid("stream_options: expected an object", "stream_options")
        unknown = _anthropic_field(payload)
        if unknown is not None:  # as OpenAI answers a field it does not know
            raise self.invalid(f"Unrecognized request argument supplied: {unknown}", unknown)
        n = payload.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
            raise self.invalid("Only n=1 is supported by the Headrace simulator.", "n")
        check_number(payload, "temperature", 0.0, 2.0)
        max_tokens = positive_int(payload, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = positive_int(payload, "max_tokens")
        return CallSpec(
            model=model,
            prompt=messages,
            prompt_tokens=count_prompt_tokens(messages),
            max_tokens=max_tokens,
            stops=string_list(payload.get("stop"), "stop", 4),
            last_user_text=text_of_last_user_message(messages),
            stream=bool(stream),
            stream_usage=bool(options and options.get("include_usage")),
            tool=_forced_tool(payload),
            cache_points=openai_points(payload),
        )

    def cache_use(self, cache: PromptCache, scope: Any, spec: CallSpec, config: SimConfig) -> CacheUse:
        min_tokens = config.openai_cache_min_tokens
        return cache.settle(scope, spec.cache_points, min_tokens=min_tokens, step=OPENAI_STEP_TOKENS)

    def limits(self, config: SimConfig) -> dict[str, int | None]:
        return {"requests": config.rpm, "tokens": config.tpm}

    def charges(self, spec: CallSpec, output_reserve: int) -> dict[str, int]:
        return {"requests": 1, "tokens": spec.prompt_tokens + output_reserve}

    def invalid(self, message: str, param: str | None = None) -> SimError:
        return SimError(400, message, "invalid_request_error", param=param)

    def status_error(self, status: int, model: str | None) -> SimError:
        default_type = "server_error" if status >= 500 else "invalid_request_error"
        kind, code, message = _STATUS_ERRORS.get(status, (default_type, None, f"Simulated error {status}."))
        return SimError(status, message.format(model=model or "unknown"), kind, code=code)

    def context_length_error(self, spec: CallSpec) -> SimError:
        asked = max(spec.prompt_tokens, CONTEXT_WINDOW_TOKENS + 1)
        message = (
            f"This model's maximum context length is {CONTEXT_WINDOW_TOKENS} tokens. However, your "
            f"messages resulted in {asked} tokens. Please reduce the length of the messages."
        )
        return SimError(
            400, message, "invalid_request_error", code="context_length_exceeded", param="messages"
        )

    def retry_headers(self, wait_s: float) -> dict[str, str]:
        # The SDKs prefer retry-after-ms; retry-after is whole seconds rounded up.
        return {"retry-after-ms": str(math.ceil(wait_s * 1000)), "retry-after": str(math.ceil(wait_s))}

    def rate_limited(self, denial: Denial, model: str) -> SimError:
        words, short = _BUCKET_WORDS.get(denial.bucket, (denial.bucket, denial.bucket.upper()))
        where = f"for {model} in organization org-headrace-sim on {words} per min ({short})"
        if denial.wait_s is None:
            message = (
                f"Request too large {where}: Limit {denial.limit}, Requested {denial.requested}. "
                f"The input or output tokens must be reduced in order to run successfully. {_LIMITS_URL}"
            )
            return SimError(429, message, words, code="rate_limit_exceeded")
        message = (
            f"Rate limit reached {where}: Limit {denial.limit}, Used {denial.used}, Requested "
            f"{denial.requested}. Please try again in {go_duration(denial.wait_s)}. {_LIMITS_URL}"
        )
        return SimError(
            429, message, words, code="rate_limit_exceeded", headers=self.retry_headers(denial.wait_s)
        )

    def error_body(self, error: SimError, request_id: str) -> dict[str, Any]:
        return {
            "error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}
        }

    def success_body(self, spec: CallSpec, answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        finish_reason = "length" if answer.finish == "length" else "stop"
        if spec.tool is not None:
            # A forced tool call: the answer's words become its one argument.
            arguments = json.dumps({"text": answer.text})
            function = {"name": spec.tool, "arguments": arguments}
            message["content"] = None
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}
            message["tool_calls"] = [call]
            finish_reason = "tool_calls"
        message.update({"refusal": None, "annotations": []})
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:29]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": spec.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": {
                "prompt_tokens": spec.prompt_tokens,
                "completion_tokens": answer.output_tokens,
                "total_tokens": spec.prompt_tokens + answer.output_tokens,
                # prompt_tokens includes them, as OpenAI counts.
                "prompt_tokens_details": {"cached_tokens": spec.cache.read_tokens, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": "default",
            "system_fingerprint": "fp_headrace_sim",
        }

    def stream_chunks(self, spec: CallSpec, body: dict[str, Any]) -> list[str]:
        return openai_sends(body, include_usage=spec.stream_usage)

    def response_headers(self, request_id: str, processing_ms: int) -> dict[str, str]:
        return {
            "x-request-id": request_id,
            "openai-processing-ms": str(processing_ms),
            "openai-version": "2020-10-01",
            "openai-organization": "org-headrace-sim",
        }

    def limit_headers(self, states: list[BucketState]) -> dict[str, str]:
        headers: dict[str, str] = {}
        for state in states:
            headers[f"x-ratelimit-limit-{state.bucket}"] = str(state.limit)
            headers[f"x-ratelimit-remaining-{state.bucket}"] = str(state.remaining)
            headers[f"x-ratelimit-reset-{state.bucket}"] = go_duration(state.reset_s)
        return headers
