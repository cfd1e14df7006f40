"""The Anthropic-only parts a canonical (Chat Completions) body may carry, and where they go.

The canonical body is OpenAI's shape; what only Anthropic understands rides in it the way
OpenRouter and LiteLLM carry it, so that a body written for either reads the same here:

- ``cache_control`` (``{"type": "ephemeral", "ttl"?: "5m" | "1h"}``) on a content part of any
  message (system, user, assistant, tool), on a tool (next to ``type`` and ``function``), and at
  the top level (Anthropic's automatic breakpoint on the last cacheable block);
- ``thinking``, the top-level Messages parameter as Anthropic takes it;
- ``thinking_blocks`` on an assistant message: its ``thinking`` blocks (with their ``signature``)
  and ``redacted_thinking`` blocks, in their order, passed back unmodified as Anthropic requires.

The Anthropic adapter puts each back where Messages wants it (``anthropic_translate``) and returns
a reply's thinking as ``thinking_blocks`` (and ``reasoning_content``, its text) on the message.
The OpenAI adapter never sends them (``without_anthropic_parts``): OpenAI rejects fields it does
not know. A request carrying them that an OpenAI deployment answers gets the note
``{"dropped_for_openai": [...]}`` on its result line (``dropped_for_openai`` below).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.providers.base import TranslationError

CACHE_CONTROL = "cache_control"
THINKING = "thinking"
THINKING_BLOCKS = "thinking_blocks"
_THINKING_KINDS = frozenset({"thinking", "redacted_thinking"})


def anthropic_parts(body: Mapping[str, Any]) -> list[str]:
    """Which Anthropic-only parts ``body`` carries: ``cache_control`` and/or ``thinking``."""
    cached = CACHE_CONTROL in body or any(_has_cache_control(t) for t in _list(body.get("tools")))
    thinking = THINKING in body
    for message in _list(body.get("messages")):
        if not isinstance(message, Mapping):
            continue
        thinking = thinking or THINKING_BLOCKS in message
        cached = cached or any(_has_cache_control(p) for p in _list(message.get("content")))
    return [name for name, found in ((CACHE_CONTROL, cached), (THINKING, thinking)) if found]


def without_anthropic_parts(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """``body`` without its Anthropic-only parts (``body`` itself when it has none; never changed)."""
    if not anthropic_parts(body):
        return body
    out = {k: v for k, v in body.items() if k not in (CACHE_CONTROL, THINKING)}
    if isinstance(body.get("tools"), list):
        out["tools"] = [_without(tool, CACHE_CONTROL) for tool in body["tools"]]
    if isinstance(body.get("messages"), list):
        out["messages"] = [_plain_message(m) for m in body["messages"]]
    return out


def dropped_for_openai(provider: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The note for the result line of a request a ``provider`` deployment answered: what it was
    not sent; None when nothing was left out."""
    if provider == "anthropic":
        return None
    dropped = anthropic_parts(body)
    return {"dropped_for_openai": dropped} if dropped else None


def cache_control(where: str, source: Mapping[str, Any]) -> dict[str, Any]:
    """``{"cache_control": ...}`` to add to the Messages block built from ``source``, or ``{}``."""
    value = source.get(CACHE_CONTROL)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str):
        raise TranslationError(f"{where}: cache_control must be an object with a type")
    return {CACHE_CONTROL: dict(value)}


def thinking_blocks(index: int, message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``thinking``/``redacted_thinking`` blocks an assistant message carries, as Messages
    blocks (they lead the turn)."""
    raw = message.get(THINKING_BLOCKS)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TranslationError(f"messages[{index}]: thinking_blocks must be a list")
    blocks: list[dict[str, Any]] = []
    for block in raw:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if not isinstance(block, Mapping) or kind not in _THINKING_KINDS:
            raise TranslationError(f"messages[{index}]: thinking_blocks take thinking or redacted_thinking")
        fields = ("thinking", "signature") if kind == "thinking" else ("data",)
        if not all(isinstance(block.get(f), str) for f in fields):
            raise TranslationError(f"messages[{index}]: a {kind} block needs string {' and '.join(fields)}")
        blocks.append({"type": kind, **{f: block[f] for f in fields}})
    return blocks


def reply_thinking(content: list[Any]) -> dict[str, Any]:
    """What a Message's thinking blocks add to the ``chat.completion`` message: ``thinking_blocks``
    (to pass back in a later turn) and ``reasoning_content`` (their text); ``{}`` without any."""
    blocks = [dict(b) for b in content if isinstance(b, Mapping) and b.get("type") in _THINKING_KINDS]
    if not blocks:
        return {}
    text = "".join(str(b.get("thinking") or "") for b in blocks if b["type"] == "thinking")
    return {THINKING_BLOCKS: blocks, "reasoning_content": text}


def _plain_message(message: Any) -> Any:
    if not isinstance(message, Mapping):
        return message
    out = {k: v for k, v in message.items() if k != THINKING_BLOCKS}
    content = message.get("content")
    if isinstance(content, list) and any(_has_cache_control(p) for p in content):
        out["content"] = [_without(part, CACHE_CONTROL) for part in content]
    return out


def _without(item: Any, key: str) -> Any:
    if not isinstance(item, Mapping) or key not in item:
        return item
    return {k: v for k, v in item.items() if k != key}


def _has_cache_control(item: Any) -> bool:
    return isinstance(item, Mapping) and CACHE_CONTROL in item


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
