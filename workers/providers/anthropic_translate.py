"""Translate the canonical request (an OpenAI Chat Completions body) to Anthropic Messages and back.

Pure functions, no I/O: ``chat_to_messages`` builds the HTTP JSON body for ``POST /v1/messages``
(wire format, not SDK kwargs); the reply goes back through ``workers.providers.anthropic_reply``.
Mapping: reference api-compat.md §4.3. Choices where that table leaves room:

- ``temperature`` is *clamped* from OpenAI's 0..2 into Anthropic's 0..1, not scaled: 0.2 means
  much the same on both, and halving would shift every low temperature a prompt was tuned with.
  It and ``top_p`` stay in the wire body (anthropic SDK >= 1.0 needs them in ``extra_body``).
- Anthropic requires the first message to be ``user``: if the first non-system message is
  ``assistant`` we raise TranslationError rather than invent a user turn the caller never wrote.
  A *final* assistant message passes through as prefill (some models answer 400).
- The body is built from an allow-list, so no unknown key reaches Anthropic. Dropped silently:
  ``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``seed``, ``logprobs``,
  ``top_logprobs``, ``service_tier``, ``store``, ``stream_options``, ``metadata`` (OpenAI's, not
  Anthropic's), ``parallel_tool_calls`` once mapped, and for forward compatibility any key not
  named here (``reasoning_effort``, ``prediction``, ...); also message ``name``, image ``detail``
  and tool ``strict`` (models without structured outputs reject it). ``user`` (else
  ``safety_identifier``) becomes ``metadata.user_id``.
- TranslationError (the request's fault, never retried) for ``n`` > 1, ``stream: true``,
  ``response_format`` other than text, legacy function calling (``functions``, ``function_call``,
  role ``function``), non-function tools, and content parts Anthropic cannot take.
- ``system``/``developer`` messages are hoisted in order from anywhere: one string joined with
  "\\n\\n" if all are strings, else text blocks, one per part (keeps the caller's boundaries).
- The Anthropic-only parts of the canonical body (``workers.providers.anthropic_parts``) go back
  where Messages wants them: ``cache_control`` from a content part to its block (system blocks
  included: a system message with a breakpoint makes ``system`` a list of blocks), from a tool to
  its tool, and at the top level; ``thinking`` top-level; an assistant message's
  ``thinking_blocks`` first in its turn. A block with ``cache_control`` is never shortened to the
  plain-string form.
- Empty text is dropped and a message left empty is skipped: Anthropic rejects empty text blocks.
  Same-role neighbours (``tool`` counts as user) merge; ``tool_result`` blocks lead a user turn.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

from workers.providers.anthropic_parts import CACHE_CONTROL, THINKING, cache_control, thinking_blocks
from workers.providers.anthropic_reply import message_to_chat, usage_from_message
from workers.providers.base import TranslationError

__all__ = ["chat_to_messages", "message_to_chat", "usage_from_message"]

_IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# OpenAI allows images only in user content; assistant content may hold refusal parts.
_USER_PARTS = frozenset({"text", "image_url"})
_ASSISTANT_PARTS = frozenset({"text", "refusal"})
_TEXT_PARTS = frozenset({"text"})
_TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


def chat_to_messages(body: Mapping[str, Any], *, model: str, default_max_tokens: int) -> dict[str, Any]:
    """The Anthropic Messages request body for a Chat Completions ``body``, sent to ``model``.

    Raises TranslationError when the request cannot be expressed for Anthropic.
    """
    _reject_unsupported(body)
    system, messages = _convert_messages(body.get("messages"))
    max_tokens = _max_tokens(body, default_max_tokens)
    out: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        out["system"] = system
    stop = _stop_sequences(body.get("stop"))
    if stop:
        out["stop_sequences"] = stop
    temperature, top_p = _number(body, "temperature"), _number(body, "top_p")
    if temperature is not None:
        out["temperature"] = min(max(temperature, 0.0), 1.0)  # clamp, not scale: see above
    if top_p is not None:
        out["top_p"] = top_p
    user = body.get("user") or body.get("safety_identifier")
    if user is not None:
        if not isinstance(user, str):
            raise TranslationError(f"user must be a string, got {type(user).__name__}")
        out["metadata"] = {"user_id": user}
    out.update(_tools(body))
    thinking = body.get(THINKING)
    if thinking is not None:
        if not isinstance(thinking, Mapping):
            raise TranslationError(f"thinking must be an object, got {type(thinking).__name__}")
        out[THINKING] = dict(thinking)
    out.update(cache_control("the request", body))  # Anthropic's automatic breakpoint
    return out


def _reject_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise TranslationError(f"n={n!r} is not supported on Anthropic deployments: send separate requests")
    if body.get("stream"):
        raise TranslationError("stream: true is not supported: Headrace makes one non-streaming call")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        kind = fmt.get("type") if isinstance(fmt, Mapping) else fmt
        raise TranslationError(f"response_format {kind!r} is not supported on Anthropic deployments")
    for key in ("functions", "function_call"):
        if body.get(key) is not None:
            raise TranslationError(f"legacy {key!r} is not supported on Anthropic deployments: use tools")


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    # Anthropic requires max_tokens; OpenAI makes it optional, so the deployment supplies one.
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TranslationError(f"{key} must be a positive integer, got {value!r}")
        return value
    return default


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TranslationError(f"{key} must be a number, got {value!r}")
    return value


def _stop_sequences(stop: Any) -> list[str]:
    seqs = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(seqs, list) or not all(isinstance(s, str) for s in seqs):
        raise TranslationError(f"stop must be a string or a list of strings, got {stop!r}")
    return [s for s in seqs if s]


def _tools(body: Mapping[str, Any]) -> dict[str, Any]:
    raw_tools, raw_choice = body.get("tools"), body.get("tool_choice")
    if not raw_tools:
        # Without tools, auto/none mean nothing; a demand for a tool cannot be met.
        if raw_choice not in (None, "auto", "none"):
            raise TranslationError(f"tool_choice {raw_choice!r} needs tools, and the request has none")
        return {}
    if not isinstance(raw_tools, list):
        raise TranslationError(f"tools must be a list, got {type(raw_tools).__name__}")
    out: dict[str, Any] = {"tools": [_tool(i, t) for i, t in enumerate(raw_tools)]}
    choice = _tool_choice(raw_choice)
    if body.get("parallel_tool_calls") is False:
        choice = choice or {"type": "auto"}
        if choice["type"] != "none":  # Anthropic rejects the flag on "none"
            choice["disable_parallel_tool_use"] = True
    if choice:
        out["tool_choice"] = choice
    return out


def _tool(index: int, tool: Any) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise TranslationError(f"tools[{index}]: only function tools with a name are supported on Anthropic")
    name: str = fn["name"]
    schema = fn.get("parameters")
    if schema is None:
        schema = {"type": "object", "properties": {}}
    elif not isinstance(schema, Mapping) or schema.get("type") != "object":
        raise TranslationError(f"tools[{index}] ({name}): parameters must be a JSON schema of type 'object'")
    out: dict[str, Any] = {"name": name}
    description = fn.get("description")
    if description:
        out["description"] = str(description)
    out["input_schema"] = copy.deepcopy(dict(schema))  # the caller's body stays its own
    out.update(cache_control(f"tools[{index}]", tool))
    return out


def _tool_choice(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str) and choice in _TOOL_CHOICES:
        return {"type": _TOOL_CHOICES[choice]}
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    raise TranslationError(f"tool_choice {choice!r} is not supported on Anthropic deployments")


def _convert_messages(raw: Any) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise TranslationError("messages must be a non-empty list")
    system: list[dict[str, Any]] = []
    system_is_plain = True
    turns: list[dict[str, Any]] = []
    first_index = 0
    for i, msg in enumerate(raw):
        if not isinstance(msg, Mapping):
            raise TranslationError(f"messages[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role")
        if role in ("system", "developer"):
            system_is_plain = system_is_plain and isinstance(msg.get("content"), str)
            system.extend(_content_blocks(i, msg.get("content"), _TEXT_PARTS))
            continue
        if role == "user":
            blocks = _content_blocks(i, msg.get("content"), _USER_PARTS)
        elif role == "assistant":
            blocks = _assistant_blocks(i, msg)
        elif role == "tool":
            role, blocks = "user", [_tool_result(i, msg)]
        elif role == "function":
            raise TranslationError(f"messages[{i}]: legacy role 'function' is not supported: use role 'tool'")
        elif role is None:
            raise TranslationError(f"messages[{i}] has no role")
        else:
            raise TranslationError(f"messages[{i}]: role {role!r} is not supported")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            if not turns:
                first_index = i
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise TranslationError("messages has no user or assistant content")
    if turns[0]["role"] != "user":
        raise TranslationError(
            f"messages[{first_index}]: the first non-system message must be from the user "
            "(Anthropic requires conversations to start with a user turn)"
        )
    for turn in turns:
        content = turn["content"]
        content.sort(key=lambda block: block["type"] != "tool_result")  # stable: keeps order otherwise
        if len(content) == 1 and content[0]["type"] == "text" and CACHE_CONTROL not in content[0]:
            turn["content"] = content[0]["text"]  # the plain-string shorthand Anthropic documents
    if not system:
        return None, turns
    if system_is_plain:  # strings only, so no cache_control to keep
        return "\n\n".join(block["text"] for block in system), turns
    return system, turns


def _content_blocks(index: int, content: Any, allowed: frozenset[str]) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise TranslationError(
            f"messages[{index}]: content must be a string or a list, not {type(content).__name__}"
        )
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in allowed:
            raise TranslationError(
                f"messages[{index}]: content part type {kind!r} is not supported on Anthropic"
            )
        cached = cache_control(f"messages[{index}]", part)  # the caller's breakpoint, kept
        if kind == "image_url":
            blocks.append({**_image(index, part.get("image_url")), **cached})
            continue
        text = part.get(kind)  # a text part's "text", a refusal part's "refusal"
        if not isinstance(text, str):
            raise TranslationError(f"messages[{index}]: {kind} part has no string {kind!r}")
        if text:
            blocks.append({"type": "text", "text": text, **cached})
    return blocks


def _image(index: int, spec: Any) -> dict[str, Any]:
    url = spec.get("url") if isinstance(spec, Mapping) else None
    if not isinstance(url, str):
        raise TranslationError(f"messages[{index}]: image_url part has no url")
    if url.startswith("data:"):
        header, comma, data = url[len("data:") :].partition(",")
        params = header.split(";")
        media_type = params[0].lower()
        if not comma or params[-1] != "base64":
            raise TranslationError(f"messages[{index}]: image data URL must be base64-encoded")
        if media_type not in _IMAGE_MEDIA_TYPES:
            raise TranslationError(f"messages[{index}]: image type {media_type!r} is not supported")
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise TranslationError(f"messages[{index}]: image url must be a data: or http(s) URL")


def _assistant_blocks(index: int, msg: Mapping[str, Any]) -> list[dict[str, Any]]:
    if msg.get("function_call") is not None:
        raise TranslationError(f"messages[{index}]: legacy function_call is not supported: use tool_calls")
    content = msg.get("content")
    # Thinking blocks lead the turn, passed back unmodified (Anthropic checks their signatures).
    blocks = thinking_blocks(index, msg)
    if content is not None:
        blocks.extend(_content_blocks(index, content, _ASSISTANT_PARTS))
    calls = msg.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise TranslationError(f"messages[{index}]: tool_calls must be a list")
        blocks.extend(_tool_use(index, call) for call in calls)
    return blocks


def _tool_use(index: int, call: Any) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    call_id = call.get("id") if isinstance(call, Mapping) else None
    if not isinstance(call_id, str) or not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise TranslationError(f"messages[{index}]: each tool call needs an id and a function name")
    if call.get("type", "function") != "function":
        raise TranslationError(f"messages[{index}]: tool call {call_id!r} is not a function call")
    arguments = fn.get("arguments")
    try:
        # Some clients send "" for a tool that takes no arguments.
        parsed = json.loads(arguments) if arguments else {}
    except (TypeError, ValueError):
        raise TranslationError(
            f"messages[{index}]: tool call {call_id!r} arguments are not valid JSON"
        ) from None
    if not isinstance(parsed, dict):
        raise TranslationError(f"messages[{index}]: tool call {call_id!r} arguments must be a JSON object")
    return {"type": "tool_use", "id": call_id, "name": fn["name"], "input": parsed}


def _tool_result(index: int, msg: Mapping[str, Any]) -> dict[str, Any]:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str):
        raise TranslationError(f"messages[{index}]: tool message has no tool_call_id")
    blocks = _content_blocks(index, msg.get("content"), _TEXT_PARTS)
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id}
    if blocks:  # content is optional on a tool_result, and Anthropic rejects empty text
        lone_text = len(blocks) == 1 and CACHE_CONTROL not in blocks[0]
        result["content"] = blocks[0]["text"] if lone_text else blocks
    return result
