"""Anthropic Messages: request validation, bodies, errors and anthropic-ratelimit-* headers."""

from __future__ import annotations

import base64
import hashlib
import math
import secrets
import string
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
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
from headrace.simulator.prompt_cache import CacheUse, PromptCache, anthropic_points
from headrace.simulator.streams import anthropic_sends
from headrace.simulator.tokens import count_prompt_tokens

CONTEXT_WINDOW_TOKENS = 200_000
_ALPHABET = string.ascii_letters + string.digits
_LIMITS_HINT = (
    "For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response "
    "headers for current usage. Please reduce the prompt length or the maximum tokens requested, "
    "or try again later."
)
# status -> (error.type, message)
_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request (simulated)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API (simulated)."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: {model}"),
    408: ("timeout_error", "Request timed out (simulated)."),
    409: ("conflict_error", "Conflict (simulated)."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit (simulated)."),
    500: ("api_error", "Internal server error"),
    503: ("api_error", "Service unavailable: the simulated upstream is overloaded."),
    504: ("timeout_error", "Request timed out while waiting for the model."),
    529: ("overloaded_error", "Overloaded"),
}
_BUCKET_WORDS = {
    "requests": "requests",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
}


def _random_id(prefix: str, length: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def rfc3339_after(seconds: float) -> str:
    # Rounded up to a whole second so the timestamp never promises capacity too early.
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    if moment.microsecond:
        moment = moment.replace(microsecond=0) + timedelta(seconds=1)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class AnthropicDialect:
    name = "anthropic"
    output_bucket = "output_tokens"
    cache_free_bucket: str | None = "input_tokens"  # cache-aware ITPM: cache reads do not count

    def new_request_id(self) -> str:
        return _random_id("req_011C")

    def authenticate(self, headers: Mapping[str, str], require_key: bool) -> str:
        # SDK 0.x/1.x send x-api-key, 2.x sends Authorization: Bearer; accept both.
        key = bearer_or_api_key(headers, allow_x_api_key=True)
        if require_key and not key:
            raise SimError(401, "x-api-key header is required", "authentication_error")
        if not headers.get("anthropic-version"):
            raise self.invalid("anthropic-version: header is required")
        return key

    def parse(self, payload: Any) -> CallSpec:
        try:
            return self._parse(payload)
        except FieldError as error:
            raise self.invalid(error.message, error.param) from None

    def _parse(self, payload: Any) -> CallSpec:
        if not isinstance(payload, dict):
            raise FieldError("There was an issue with your request body: expected a JSON object", None)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise FieldError("model: Field required", "model")
        max_tokens = positive_int(payload, "max_tokens")
        if max_tokens is None:
            raise FieldError("max_tokens: Field required", "max_tokens")
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise FieldError("messages: Field required (a non-empty array)", "messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                raise FieldError(f"messages.{index}.role: Input should be 'user' or 'assistant'", "messages")
            if not isinstance(message.get("content"), str | list):
                raise FieldError(f"messages.{index}.content: Field required", "messages")
        system = payload.get("system")
        if system is not None and not _valid_system(system):
            raise FieldError("system: Input should be a string or a list of text blocks", "system")
        stream = payload.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise FieldError("stream: Input should be a valid boolean", "stream")
        check_number(payload, "temperature", 0.0, 1.0)
        thinking = _thinking(payload.get("thinking"), max_tokens)
        _check_cache_controls(payload)
        _check_thinking_history(messages)
        try:
            cache_points = anthropic_points(payload)
        except ValueError as error:
            raise FieldError(str(error), None) from None
        return CallSpec(
            model=model,
            prompt={"system": system, "messages": messages},
            prompt_tokens=count_prompt_tokens(messages, system=system),
            max_tokens=max_tokens,
            stops=string_list(payload.get("stop_sequences"), "stop_sequences", 8191),
            last_user_text=text_of_last_user_message(messages),
            stream=bool(stream),
            tool=_forced_tool(payload),
            cache_points=cache_points,
            thinking=thinking,
        )

    def cache_use(self, cache: PromptCache, scope: Any, spec: CallSpec, config: SimConfig) -> CacheUse:
        return cache.settle(scope, spec.cache_points, min_tokens=config.anthropic_cache_min_tokens, step=0)

    def limits(self, config: SimConfig) -> dict[str, int | None]:
        return {"requests": config.anthropic_rpm, "input_tokens": config.itpm, "output_tokens": config.otpm}

    def charges(self, spec: CallSpec, output_reserve: int) -> dict[str, int]:
        # Anthropic meters input and output separately and reserves max_tokens of output up front.
        return {"requests": 1, "input_tokens": spec.prompt_tokens, "output_tokens": output_reserve}

    def invalid(self, message: str, param: str | None = None) -> SimError:
        return SimError(400, message, "invalid_request_error", param=param)

    def status_error(self, status: int, model: str | None) -> SimError:
        default_type = "api_error" if status >= 500 else "invalid_request_error"
        kind, message = _STATUS_ERRORS.get(status, (default_type, f"Simulated error {status}."))
        return SimError(status, message.format(model=model or "unknown"), kind)

    def context_length_error(self, spec: CallSpec) -> SimError:
        asked = max(spec.prompt_tokens, CONTEXT_WINDOW_TOKENS + 1)
        message = f"prompt is too long: {asked} tokens > {CONTEXT_WINDOW_TOKENS} maximum"
        return SimError(400, message, "invalid_request_error")

    def retry_headers(self, wait_s: float) -> dict[str, str]:
        # Anthropic sends whole seconds only.
        return {"retry-after": str(math.ceil(wait_s))}

    def rate_limited(self, denial: Denial, model: str) -> SimError:
        words = _BUCKET_WORDS.get(denial.bucket, denial.bucket)
        message = (
            f"This request would exceed the rate limit for your organization of {denial.limit:,} "
            f"{words} per minute. {_LIMITS_HINT}"
        )
        headers = {} if denial.wait_s is None else self.retry_headers(denial.wait_s)
        return SimError(429, message, "rate_limit_error", headers=headers)

    def error_body(self, error: SimError, request_id: str) -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": error.type, "message": error.message},
            "request_id": request_id,
        }

    def success_body(self, spec: CallSpec, answer: Answer) -> dict[str, Any]:
        stop_reason = {"end": "end_turn", "length": "max_tokens", "stop": "stop_sequence"}[answer.finish]
        content: list[dict[str, Any]] = [{"type": "text", "text": answer.text}]
        stop_sequence = answer.stop_sequence
        if spec.tool is not None:
            # A forced tool call: the answer's words become its one argument.
            call_id = _random_id("toolu_01")
            content = [{"type": "tool_use", "id": call_id, "name": spec.tool, "input": {"text": answer.text}}]
            stop_reason, stop_sequence = "tool_use", None
        if spec.thinking:  # not billed here: the answer's tokens stay the answer's words
            thought = f"The user asks {spec.last_user_text[:80]!r}; a short answer will do."
            content.insert(0, {"type": "thinking", "thinking": thought, "signature": signature(thought)})
        cache = spec.cache
        return {
            "id": _random_id("msg_01"),
            "type": "message",
            "role": "assistant",
            "model": spec.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                # As Anthropic counts: input_tokens leaves the cache's reads and writes out.
                "input_tokens": spec.prompt_tokens - cache.read_tokens - cache.write_tokens,
                "output_tokens": answer.output_tokens,
                "cache_creation_input_tokens": cache.write_tokens,
                "cache_read_input_tokens": cache.read_tokens,
                "service_tier": "standard",
            },
        }

    def stream_chunks(self, spec: CallSpec, body: dict[str, Any]) -> list[str]:
        return anthropic_sends(body)

    def response_headers(self, request_id: str, processing_ms: int) -> dict[str, str]:
        return {"request-id": request_id, "anthropic-organization-id": "org-headrace-sim"}

    def limit_headers(self, states: list[BucketState]) -> dict[str, str]:
        # Remaining counts are exact, not rounded to thousands as the real API does, so small
        # test limits stay readable.
        headers: dict[str, str] = {}
        for state in states:
            _put(headers, state.bucket.replace("_", "-"), state)
        token_states = [s for s in states if s.bucket != "requests"]
        if token_states:
            _put(headers, "tokens", min(token_states, key=lambda s: s.remaining))
        return headers


def _put(headers: dict[str, str], name: str, state: BucketState) -> None:
    headers[f"anthropic-ratelimit-{name}-limit"] = str(state.limit)
    headers[f"anthropic-ratelimit-{name}-remaining"] = str(state.remaining)
    headers[f"anthropic-ratelimit-{name}-reset"] = rfc3339_after(state.reset_s)


def _forced_tool(payload: Mapping[str, Any]) -> str | None:
    """The tool a request forces a call to: tool_choice any (the first tool) or tool (one named);
    None when the model may answer in words."""
    tools, choice = payload.get("tools"), payload.get("tool_choice")
    if not isinstance(tools, list) or not tools or not isinstance(choice, dict):
        return None
    name = None
    if choice.get("type") == "any":
        name = tools[0].get("name") if isinstance(tools[0], dict) else None
    elif choice.get("type") == "tool":
        name = choice.get("name")
    return name if isinstance(name, str) else None


def signature(thinking: str) -> str:
    """The simulator's signature of a thinking block's text, checked when it comes back."""
    return base64.b64encode(hashlib.sha256(f"headrace-sim:{thinking}".encode()).digest()).decode()


def _thinking(raw: Any, max_tokens: int) -> bool:
    """Whether the request asks for thinking; FieldError for a config Anthropic refuses."""
    if raw is None:
        return False
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("enabled", "disabled", "adaptive"):
        raise FieldError("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'", "thinking")
    if kind == "enabled":
        budget = raw.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
            raise FieldError("thinking.enabled.budget_tokens: Input should be >= 1024", "thinking")
        if max_tokens <= budget:
            raise FieldError("`max_tokens` must be greater than `thinking.budget_tokens`.", "max_tokens")
    return bool(kind != "disabled")


def _check_cache_controls(payload: Mapping[str, Any]) -> None:
    system, tools = payload.get("system"), payload.get("tools")
    blocks: list[Any] = [payload, *(tools if isinstance(tools, list) else [])]
    blocks += system if isinstance(system, list) else []
    for message in payload.get("messages") or []:
        content = message.get("content")
        blocks += content if isinstance(content, list) else []
    for block in blocks:
        control = block.get("cache_control") if isinstance(block, dict) else None
        if control is None:
            continue
        ttl = control.get("ttl") if isinstance(control, dict) else None
        if (
            not isinstance(control, dict)
            or control.get("type") != "ephemeral"
            or ttl not in (None, "5m", "1h")
        ):
            raise FieldError("cache_control: Input should be {'type': 'ephemeral'} with ttl 5m or 1h", None)


def _check_thinking_history(messages: list[Any]) -> None:
    """Thinking blocks passed back must be unmodified, as the real API checks their signature."""
    for index, message in enumerate(messages):
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict) or block.get("type") != "thinking":
                continue
            thought = block.get("thinking")
            if not isinstance(thought, str) or block.get("signature") != signature(thought):
                raise FieldError(f"messages.{index}.content: Invalid `signature` in `thinking` block", None)


def _valid_system(system: Any) -> bool:
    if isinstance(system, str):
        return True
    return isinstance(system, list) and all(
        isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
        for block in system
    )
