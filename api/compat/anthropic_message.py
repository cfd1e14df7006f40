"""Canonical ``chat.completion`` -> the Anthropic ``Message`` a ``succeeded`` batch result carries,
and the ``errored`` result. Pure functions, no I/O; the reverse of
``workers.providers.anthropic_reply``, which ``api/`` must not import. Choices:

- Message ids: "msg_" + the completion id without "chatcmpl-", unless that already starts with
  "msg_" (a completion Headrace translated from an Anthropic reply keeps its original id).
- A reply's ``refusal`` (with no content) becomes its text, with ``stop_reason: "refusal"``.
  ``stop`` maps to ``end_turn`` (which stop string matched is unknown), ``stop_sequence`` is null.
- A reply's ``thinking_blocks`` (an Anthropic deployment's thinking, as it sent it) lead the
  content as ``thinking`` / ``redacted_thinking`` blocks, signatures included.
- A completion that is not readable raises plain ValueError: it is not the producer's fault. Only
  the first choice is read (Anthropic params have no ``n``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_STOP_REASONS = {
    "stop": "end_turn",  # the matched stop string is unknown, so never "stop_sequence"
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# anthropic 2.12's ErrorType minus memory_precondition_failed_error, memory_path_conflict_error and
# conflict_error, which ErrorResponse's discriminated union (what the SDK parses a result line with)
# rejects. Written out, not imported: importing the SDK costs the API process ~0.9 s at start.
_ERROR_KINDS = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "rate_limit_error",
        "timeout_error",
        "api_error",
        "overloaded_error",
    }
)


def chat_to_message(completion: Mapping[str, Any], *, message_id: str | None = None) -> dict[str, Any]:
    """The Anthropic ``Message`` JSON for a canonical ``chat.completion``.

    ``message_id`` defaults to one derived from the completion's id. Raises ValueError if the
    completion has no model, no choices, or (without ``message_id``) no id.
    """
    choices, model = completion.get("choices"), completion.get("model")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise ValueError("not a chat.completion: needs a non-empty choices list")
    if not isinstance(model, str):
        raise ValueError("not a chat.completion: needs a string model")
    if message_id is None:
        completion_id = completion.get("id")
        if not isinstance(completion_id, str) or not completion_id:
            raise ValueError("not a chat.completion: needs a string id (or pass message_id)")
        bare = completion_id.removeprefix("chatcmpl-")
        message_id = bare if bare.startswith("msg_") else f"msg_{bare}"
    choice = choices[0]
    reply = choice.get("message")
    reply = reply if isinstance(reply, Mapping) else {}
    finish_reason = choice.get("finish_reason")
    stop_reason = _STOP_REASONS.get(finish_reason if isinstance(finish_reason, str) else "", "end_turn")
    text, refusal = reply.get("content"), reply.get("refusal")
    text = text if isinstance(text, str) else ""
    if not text and isinstance(refusal, str) and refusal:
        # OpenAI puts a refusal in its own field; Anthropic says it as text with stop_reason "refusal".
        text, stop_reason = refusal, "refusal"
    content = _thinking(reply)  # thinking leads a Message's content
    if text:
        content.append({"type": "text", "text": text})
    content.extend(_tool_uses(reply))
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(completion.get("usage")),
    }


def error_result(kind: str, message: str) -> dict[str, Any]:
    """The ``result`` of an errored batch request; a ``kind`` the SDK cannot parse becomes ``api_error``."""
    if kind not in _ERROR_KINDS:
        kind = "api_error"
    return {"type": "errored", "error": {"type": "error", "error": {"type": kind, "message": message}}}


def _thinking(reply: Mapping[str, Any]) -> list[dict[str, Any]]:
    blocks = reply.get("thinking_blocks")
    out: list[dict[str, Any]] = []
    for block in blocks if isinstance(blocks, list) else []:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "thinking" and isinstance(block, Mapping):
            thinking, signature = block.get("thinking"), block.get("signature")
            out.append(
                {"type": "thinking", "thinking": str(thinking or ""), "signature": str(signature or "")}
            )
        elif kind == "redacted_thinking" and isinstance(block, Mapping):
            out.append({"type": "redacted_thinking", "data": str(block.get("data") or "")})
    return out


def _tool_uses(reply: Mapping[str, Any]) -> list[dict[str, Any]]:
    calls = reply.get("tool_calls")
    calls = calls if isinstance(calls, list) else []
    out: list[dict[str, Any]] = []
    for call in calls:
        # Custom (free-text) tool calls have no JSON input to offer as a tool_use block.
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            continue
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        call_id, name = call.get("id"), function.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            raise ValueError("chat.completion tool call needs a string id and function name")
        out.append({"type": "tool_use", "id": call_id, "name": name, "input": _arguments(function)})
    return out


def _arguments(function: Mapping[str, Any]) -> dict[str, Any]:
    arguments = function.get("arguments")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        return {}  # models do emit broken JSON; the Message stays valid and the caller sees {}
    return parsed if isinstance(parsed, dict) else {}  # Anthropic's input must be an object


def _usage(raw: Any) -> dict[str, int]:
    usage = raw if isinstance(raw, Mapping) else {}
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, Mapping) else {}

    def count(source: Mapping[str, Any], key: str) -> int:
        value = source.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    cached, written = count(details, "cached_tokens"), count(details, "cache_write_tokens")
    # OpenAI's prompt_tokens includes cache traffic; Anthropic's input_tokens excludes it.
    return {
        "input_tokens": max(count(usage, "prompt_tokens") - cached - written, 0),
        "output_tokens": count(usage, "completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": written,
    }
