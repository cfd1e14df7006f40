"""Anthropic Message Batches ``params`` -> Headrace's canonical Chat Completions body.

Pure functions, no I/O. ``messages_params_to_chat`` turns a batch request's ``params`` (an
Anthropic ``MessageCreateParams`` body) into the Chat Completions body Headrace stores and runs;
the way back (``chat.completion`` -> ``Message``, ``errored`` results) is
``api.compat.anthropic_message``. This is the reverse of ``workers.providers.anthropic_translate``
(reference api-compat.md §4.3), which ``api/`` must not import. Choices:

- ``temperature`` (Anthropic 0..1) and ``top_p`` pass through unchanged: OpenAI's 0..2 range
  contains Anthropic's. ``max_tokens`` stays ``max_tokens``; ``stop_sequences`` become ``stop``
  as given (more than 4 is left for the provider to judge: an Anthropic deployment takes them).
- Prompt caching and thinking are kept for Anthropic deployments, in the canonical body's
  Anthropic-only parts (``workers.providers.anthropic_parts``; OpenAI deployments are not sent
  them, and the result line says so): ``cache_control`` (checked: ephemeral, ttl 5m or 1h) on
  system, text and image blocks, on a tool_result (on its one text part), on tools and at the
  top level; ``thinking`` as given; an assistant turn's ``thinking``/``redacted_thinking`` blocks
  as its ``thinking_blocks``, in order and unmodified (Anthropic checks their signatures). A system
  prompt with a breakpoint stays a list of text parts, a block with one is never shortened to a
  plain string.
- Dropped without error, because Chat Completions has no equivalent and the answer is still a
  valid answer without them: ``top_k``, ``service_tier``, ``container``, ``diagnostics``,
  ``inference_geo``, ``output_config``, ``speed``, ``user_profile_id``, ``workspace_id``,
  ``stream: false``; on blocks ``citations``, image ``transformations``, tool_result ``is_error``
  (the content alone is passed), ``cache_control`` on tool_use blocks; on tools ``strict``,
  ``input_examples``, ``defer_loading``, ``allowed_callers``, ``eager_input_streaming``; thinking
  blocks in user turns; and any key not named here.
- WireError (a ValueError naming the JSON path at fault; the request's fault, so the batch result
  is ``invalid_request_error``) for ``stream: true``, missing ``model``/``max_tokens``/``messages``,
  ``document`` and server-tool blocks, file image sources, images inside ``tool_result``, server
  tools (``web_search_...``, ``bash_...``), ``tool_choice`` any/tool without tools, and a
  ``cache_control`` or ``thinking`` that is not an object of a known type.
- Messages with ``role: "system"`` are accepted (anthropic 2.12's ``MessageParam`` includes
  ``SystemMessageParam``) and become Chat system messages in place; the top-level ``system``
  comes first, text blocks joined with "\\n\\n".
- A user turn's ``tool_result`` blocks become ``role: "tool"`` messages placed before the rest
  of that turn. A lone text block becomes a plain string; several stay separate text parts.
  An assistant turn of thinking blocks only is skipped (Chat rejects a message with neither
  content nor tool calls).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any


class WireError(ValueError):
    """A batch request's ``params`` cannot be expressed as Chat Completions; the message names the path."""


_IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
_THINKING_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_DROPPED_BLOCKS = _THINKING_BLOCKS  # in user turns
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def messages_params_to_chat(params: Mapping[str, Any]) -> dict[str, Any]:
    """The canonical Chat Completions body for an Anthropic batch request's ``params``.

    Raises WireError, naming the field (``params.messages[2].content[0]: ...``), when ``params``
    is invalid or cannot be expressed in Chat Completions.
    """
    if not isinstance(params, Mapping):
        raise WireError("params: must be an object")
    if params.get("stream") not in (None, False):
        raise WireError("params.stream: streaming is not supported in batches")
    model = _string("params.model", params.get("model"))
    max_tokens = params.get("max_tokens")
    # 0 (cache pre-warming) is valid on Anthropic's live API but yields no batch answer.
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise WireError(f"params.max_tokens: required, an integer >= 1 (got {max_tokens!r})")
    body: dict[str, Any] = {"model": model, "messages": _messages(params), "max_tokens": max_tokens}
    stop = params.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise WireError("params.stop_sequences: must be a list of strings")
        if stop:
            body["stop"] = list(stop)
    for key in ("temperature", "top_p"):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"params.{key}: must be a number, got {value!r}")
        body[key] = value
    metadata = params.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise WireError("params.metadata: must be an object")
    if metadata and metadata.get("user_id") is not None:
        body["user"] = _string("params.metadata.user_id", metadata["user_id"], empty_ok=True)
    body.update(_tools(params.get("tools"), params.get("tool_choice")))
    thinking = params.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, Mapping) or not isinstance(thinking.get("type"), str):
            raise WireError("params.thinking: must be an object with a string 'type'")
        body["thinking"] = copy.deepcopy(dict(thinking))
    body.update(_cache_control("params", params))  # the automatic breakpoint
    return body


def _messages(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _system("params.system", params.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    raw = params.get("messages")
    if not isinstance(raw, list) or not raw:
        raise WireError("params.messages: required, a non-empty list")
    for i, msg in enumerate(raw):
        where = f"params.messages[{i}]"
        if not isinstance(msg, Mapping):
            raise WireError(f"{where}: must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role == "user":
            out.extend(_user_turn(f"{where}.content", content))
        elif role == "assistant":
            out.extend(_assistant_turn(f"{where}.content", content))
        elif role == "system":
            text = _system(f"{where}.content", content)
            if text:
                out.append({"role": "system", "content": text})
        else:
            raise WireError(f"{where}.role: must be 'user' or 'assistant', got {role!r}")
    return out


def _blocks(path: str, content: Any) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(path, type, block) for each block of a content list; rejects anything else."""
    if not isinstance(content, list):
        raise WireError(f"{path}: must be a string or a list of content blocks")
    if not content:
        raise WireError(f"{path}: must not be empty")
    out: list[tuple[str, str, Mapping[str, Any]]] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if not isinstance(block, Mapping) or not isinstance(kind, str):
            raise WireError(f"{path}[{j}]: must be a content block object with a string 'type'")
        out.append((f"{path}[{j}]", kind, block))
    return out


def _unsupported(path: str, kind: str, role: str) -> WireError:
    if kind == "document":
        return WireError(f"{path}: unsupported block type 'document': Chat Completions takes no documents")
    return WireError(f"{path}: unsupported block type {kind!r} in {role} messages")


def _user_turn(path: str, content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block_path, kind, block in _blocks(path, content):
        if kind == "text":
            parts.append(
                {"type": "text", "text": _text(block_path, block), **_cache_control(block_path, block)}
            )
        elif kind == "image":
            parts.append({**_image(block_path, block), **_cache_control(block_path, block)})
        elif kind == "tool_result":
            tool_messages.append(_tool_result(block_path, block))
        elif kind not in _DROPPED_BLOCKS:
            raise _unsupported(block_path, kind, "user")
    # Chat wants each tool answer right after the assistant's calls, before any new user text.
    out = tool_messages
    if parts:
        out.append({"role": "user", "content": _content(parts)})
    return out


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """A lone text part (with no cache breakpoint) as the plain string; else the parts."""
    lone_text = len(parts) == 1 and parts[0]["type"] == "text" and "cache_control" not in parts[0]
    return parts[0]["text"] if lone_text else parts


def _assistant_turn(path: str, content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}]
    texts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    for block_path, kind, block in _blocks(path, content):
        if kind == "text":
            texts.append(
                {"type": "text", "text": _text(block_path, block), **_cache_control(block_path, block)}
            )
        elif kind == "tool_use":
            calls.append(_tool_call(block_path, block))
        elif kind in _THINKING_BLOCKS:
            thinking.append(_thinking_block(block_path, kind, block))
        else:
            raise _unsupported(block_path, kind, "assistant")
    if not texts and not calls:
        return []  # only thinking blocks: Chat rejects an assistant message with neither
    reply: dict[str, Any] = {"role": "assistant", "content": _content(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["thinking_blocks"] = thinking  # an Anthropic deployment gets them back, in order
    return [reply]


def _thinking_block(path: str, kind: str, block: Mapping[str, Any]) -> dict[str, Any]:
    # Passed back unmodified: Anthropic checks each thinking block's signature.
    fields = ("thinking", "signature") if kind == "thinking" else ("data",)
    return {"type": kind, **{f: _string(f"{path}.{f}", block.get(f), empty_ok=True) for f in fields}}


def _cache_control(path: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """``{"cache_control": ...}`` for the canonical part made from ``source``, or ``{}``."""
    value = source.get("cache_control")
    if value is None:
        return {}
    ttl = value.get("ttl") if isinstance(value, Mapping) else None
    if not isinstance(value, Mapping) or value.get("type") != "ephemeral" or ttl not in (None, "5m", "1h"):
        raise WireError(
            f"{path}.cache_control: must be {{'type': 'ephemeral'}}, with an optional ttl 5m or 1h"
        )
    return {"cache_control": dict(value)}


def _system(path: str, value: Any) -> str | list[dict[str, Any]]:
    """A system prompt: joined text, or its text blocks as parts when one has a cache breakpoint."""
    if not isinstance(value, list) or not any(isinstance(b, Mapping) and "cache_control" in b for b in value):
        return _joined_text(path, value)
    _joined_text(path, value)  # the same checks
    parts = [
        {"type": "text", "text": block["text"], **_cache_control(f"{path}[{j}]", block)}
        for j, block in enumerate(value)
        if block["text"]  # Anthropic rejects empty text blocks, breakpoint or not
    ]
    return _content(parts)


def _string(path: str, value: Any, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or not (value or empty_ok):
        raise WireError(f"{path}: required, a {'' if empty_ok else 'non-empty '}string")
    return value


def _text(path: str, block: Mapping[str, Any]) -> str:
    return _string(f"{path}.text", block.get("text"), empty_ok=True)


def _joined_text(path: str, value: Any) -> str:
    """A string, or a list of text blocks joined with blank lines (system prompts, tool results)."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise WireError(f"{path}: must be a string or a list of text blocks")
    texts: list[str] = []
    for j, block in enumerate(value):
        kind = block.get("type") if isinstance(block, Mapping) else None
        if not isinstance(block, Mapping) or kind != "text":
            raise WireError(f"{path}[{j}]: only text blocks are supported here, got {kind!r}")
        texts.append(_text(f"{path}[{j}]", block))
    return "\n\n".join(t for t in texts if t)


def _image(path: str, block: Mapping[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, Mapping) else None
    if kind == "base64" and isinstance(source, Mapping):
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in _IMAGE_MEDIA_TYPES:
            raise WireError(f"{path}.source.media_type: must be one of {_IMAGE_MEDIA_TYPES}")
        url = f"data:{media_type};base64,{_string(f'{path}.source.data', data)}"
    elif kind == "url" and isinstance(source, Mapping):
        url = _string(f"{path}.source.url", source.get("url"))
    else:
        raise WireError(f"{path}.source: image source type {kind!r} is not supported (use 'base64' or 'url')")
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(path: str, block: Mapping[str, Any]) -> dict[str, Any]:
    call_id = _string(f"{path}.tool_use_id", block.get("tool_use_id"))
    # Chat tool messages carry text only, so images or documents here cannot be expressed.
    text = _joined_text(f"{path}.content", block.get("content"))
    # A breakpoint on the result or on its last block marking one: the same prefix ends there.
    inner: list[Any] = block["content"] if isinstance(block.get("content"), list) else []
    marks = [_cache_control(path, block)]
    marks += [
        _cache_control(f"{path}.content[{j}]", b) for j, b in enumerate(inner) if isinstance(b, Mapping)
    ]
    cached: dict[str, Any] = next((m for m in reversed(marks) if m), {})
    content = [{"type": "text", "text": text, **cached}] if cached and text else text
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _tool_call(path: str, block: Mapping[str, Any]) -> dict[str, Any]:
    call_id, name = _string(f"{path}.id", block.get("id")), _string(f"{path}.name", block.get("name"))
    arguments = block.get("input")
    if not isinstance(arguments, Mapping):
        raise WireError(f"{path}.input: required, an object")
    function = {"name": name, "arguments": json.dumps(dict(arguments))}
    return {"id": call_id, "type": "function", "function": function}


def _tools(raw_tools: Any, raw_choice: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if raw_tools is not None:
        if not isinstance(raw_tools, list):
            raise WireError("params.tools: must be a list")
        if raw_tools:
            out["tools"] = [_tool(f"params.tools[{i}]", tool) for i, tool in enumerate(raw_tools)]
    if raw_choice is None:
        return out
    kind = raw_choice.get("type") if isinstance(raw_choice, Mapping) else None
    choice: str | dict[str, Any]
    if kind == "tool" and isinstance(raw_choice, Mapping):
        name = _string("params.tool_choice.name", raw_choice.get("name"))
        choice = {"type": "function", "function": {"name": name}}
    elif isinstance(kind, str) and kind in _TOOL_CHOICES:
        choice = _TOOL_CHOICES[kind]
    else:
        raise WireError(f"params.tool_choice.type: must be 'auto', 'any', 'tool' or 'none', got {kind!r}")
    if "tools" not in out:
        # OpenAI rejects tool_choice without tools: auto/none then mean nothing, any/tool cannot be met.
        if kind in ("auto", "none"):
            return out
        raise WireError(f"params.tool_choice: type {kind!r} needs tools, and params has none")
    out["tool_choice"] = choice
    if isinstance(raw_choice, Mapping) and raw_choice.get("disable_parallel_tool_use") is True:
        out["parallel_tool_calls"] = False
    return out


def _tool(path: str, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, Mapping):
        raise WireError(f"{path}: must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        # Server tools (web search, bash, code execution, ...) run inside Anthropic's API only.
        raise WireError(f"{path}.type: tool type {kind!r} is not supported, only client tools")
    name, schema = _string(f"{path}.name", tool.get("name")), tool.get("input_schema")
    description = tool.get("description")
    if not isinstance(schema, Mapping):
        raise WireError(f"{path}.input_schema: required, a JSON schema object")
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = _string(f"{path}.description", description, empty_ok=True)
    function["parameters"] = copy.deepcopy(dict(schema))  # the stored body must not alias the input
    return {"type": "function", "function": function, **_cache_control(path, tool)}
