"""Anthropic Messages replies read back into the canonical ``chat.completion`` object.

Pure functions, no I/O: ``message_to_chat`` turns the Message ``POST /v1/messages`` returns into a
``chat.completion`` object, ``usage_from_message`` reads the tokens billed. Mapping: reference
api-compat.md §4.3. Thinking blocks have no Chat Completions field: they come back as the
message's ``thinking_blocks`` (as Anthropic sent them, signatures included, to pass back in a
later turn) and ``reasoning_content`` (their text), as LiteLLM returns them
(``workers.providers.anthropic_parts``).

A reply we cannot read raises plain ValueError, so the adapter reports ``invalid_reply``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from workers.providers.anthropic_parts import reply_thinking
from workers.providers.base import Usage

_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # no equivalent: a server-tool loop paused
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def message_to_chat(
    message: Mapping[str, Any], *, created: int, request_model: str | None = None
) -> dict[str, Any]:
    """The ``chat.completion`` object for an Anthropic Message (``POST /v1/messages`` reply).

    ``model`` is the model the Message names; ``request_model`` is used only if it names none.
    Raises ValueError (not TranslationError) if the Message cannot be read.
    """
    msg_id, content = message.get("id"), message.get("content")
    model = message.get("model") or request_model
    if not isinstance(msg_id, str) or not isinstance(content, list) or not isinstance(model, str):
        raise ValueError("Anthropic reply is not a Message: needs string id and model, and a content list")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, Mapping):
            raise ValueError(f"Anthropic reply content block is not an object: {block!r}")
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise ValueError("Anthropic tool_use block needs a string id and name")
            function = {"name": name, "arguments": json.dumps(block.get("input") or {})}
            tool_calls.append({"id": call_id, "type": "function", "function": function})
        # thinking blocks: reply_thinking below; server-tool blocks have no Chat equivalent.
    text = "".join(texts) if texts else None
    reply: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    reply.update(reply_thinking(content))
    if tool_calls:
        reply["tool_calls"] = tool_calls
    usage = usage_from_message(message)
    # Anthropic's input_tokens excludes cache traffic; OpenAI's prompt_tokens includes it.
    prompt_tokens = usage.input_tokens + usage.cache_write_tokens + usage.cache_read_tokens
    finish_reason = _FINISH_REASONS.get(str(message.get("stop_reason")), "stop")
    choice = {"index": 0, "message": reply, "finish_reason": finish_reason, "logprobs": None}
    return {
        "id": f"chatcmpl-{msg_id}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": prompt_tokens + usage.output_tokens,
            "prompt_tokens_details": {
                "cached_tokens": usage.cache_read_tokens,
                "cache_write_tokens": usage.cache_write_tokens,
            },
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


def usage_from_message(message: Mapping[str, Any]) -> Usage:
    """The tokens an Anthropic Message was billed for; missing or null counts are 0."""
    usage = message.get("usage")
    if not isinstance(usage, Mapping):
        usage = {}

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    return Usage(
        input_tokens=count("input_tokens"),
        output_tokens=count("output_tokens"),
        cache_read_tokens=count("cache_read_input_tokens"),
        cache_write_tokens=count("cache_creation_input_tokens"),
    )
