"""The seam between the call pipeline and one provider's wire format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from headrace.simulator.answers import Answer
from headrace.simulator.buckets import BucketState, Denial
from headrace.simulator.config import SimConfig
from headrace.simulator.prompt_cache import CachePoint, CacheUse, PromptCache
from headrace.simulator.tokens import message_text


@dataclass(frozen=True)
class CallSpec:
    """A parsed, valid model request, in dialect-neutral terms."""

    model: str
    prompt: Any  # the input that identifies the request for its deterministic answer
    prompt_tokens: int
    max_tokens: int | None
    stops: tuple[str, ...]
    last_user_text: str
    stream: bool = False  # answer as server-sent events (headrace/simulator/streams.py)
    stream_usage: bool = False  # OpenAI's stream_options.include_usage: a last chunk with usage
    tool: str | None = None  # the tool the request forces a call to: the answer is that call
    cache_points: tuple[CachePoint, ...] = ()  # where its prompt may be cached (prompt_cache.py)
    cache: CacheUse = field(
        default_factory=CacheUse
    )  # what its answer read from and wrote to the prompt cache
    thinking: bool = False  # Anthropic extended thinking asked: the answer starts with a thinking block


class SimError(Exception):
    """An error answer; the dialect turns it into its own body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}


class Dialect(Protocol):
    name: str
    output_bucket: str  # the bucket charged for output, refunded when the answer is shorter
    cache_free_bucket: str | None  # the bucket prompt-cache reads are not charged to (None: all are)

    def new_request_id(self) -> str: ...
    def authenticate(self, headers: Mapping[str, str], require_key: bool) -> str: ...
    def parse(self, payload: Any) -> CallSpec: ...
    def limits(self, config: SimConfig) -> dict[str, int | None]: ...
    def charges(self, spec: CallSpec, output_reserve: int) -> dict[str, int]: ...
    def invalid(self, message: str, param: str | None = None) -> SimError: ...
    def status_error(self, status: int, model: str | None) -> SimError: ...
    def context_length_error(self, spec: CallSpec) -> SimError: ...
    def retry_headers(self, wait_s: float) -> dict[str, str]: ...
    def rate_limited(self, denial: Denial, model: str) -> SimError: ...
    def error_body(self, error: SimError, request_id: str) -> dict[str, Any]: ...
    def cache_use(self, cache: PromptCache, scope: Any, spec: CallSpec, config: SimConfig) -> CacheUse: ...
    def success_body(self, spec: CallSpec, answer: Answer) -> dict[str, Any]: ...
    def stream_chunks(self, spec: CallSpec, body: dict[str, Any]) -> list[str]: ...
    def response_headers(self, request_id: str, processing_ms: int) -> dict[str, str]: ...
    def limit_headers(self, states: list[BucketState]) -> dict[str, str]: ...


def bearer_or_api_key(headers: Mapping[str, str], *, allow_x_api_key: bool) -> str:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if allow_x_api_key:
        return headers.get("x-api-key", "").strip()
    return ""


def text_of_last_user_message(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


class FieldError(ValueError):
    """A request field is invalid; the dialect turns it into its 400 body."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def positive_int(payload: Mapping[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FieldError(f"{key}: expected an integer >= 1", key)
    return value


def check_number(payload: Mapping[str, Any], key: str, low: float, high: float) -> None:
    value = payload.get(key)
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise FieldError(f"{key}: expected a number between {low:g} and {high:g}", key)


def string_list(value: Any, key: str, max_items: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and len(value) <= max_items and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise FieldError(f"{key}: expected a string or an array of up to {max_items} strings", key)
