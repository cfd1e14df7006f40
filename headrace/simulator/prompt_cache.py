"""Provider prompt caching, simulated: which prefixes of a prompt were seen lately, per key and model.

Each dialect lists its prompt's cache points when it parses a call (``CachePoint``: a hash of the
prompt up to there and its tokens, counted as ``headrace.simulator.tokens`` counts the prompt), and
settles them on an answer (``PromptCache.settle``), as its provider does:

- Anthropic: the points are the ``cache_control`` breakpoints (on tools, system blocks and message
  blocks, in that order; a top-level ``cache_control`` marks the last block). The longest prefix
  found is read (``cache_read_input_tokens``); the prompt up to the last breakpoint, less what
  was read, is written (``cache_creation_input_tokens``). Prefixes under
  ``anthropic_cache_min_tokens`` are not cached. Entries live 5 minutes (``ttl: "1h"``: an
  hour) from their last use. Tools cost no tokens here (the simulator counts none for them), so a
  breakpoint on a tool caches nothing by itself.
- OpenAI: automatic. Every message and content-part boundary of a prompt of at least
  ``openai_cache_min_tokens`` is a point; the longest prefix seen within 5 minutes is read, in
  128-token steps from the minimum (``prompt_tokens_details.cached_tokens``); nothing is billed
  as written.

Bounded: the least recently used entries go beyond ``prompt_cache_entries``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from headrace.simulator.tokens import PER_MESSAGE_TOKENS, REPLY_PRIMING_TOKENS, content_tokens

OPENAI_STEP_TOKENS = 128
DEFAULT_TTL_S = 300.0
_TTLS_S = {"5m": 300.0, "1h": 3600.0}
MAX_BREAKPOINTS = 4  # Anthropic's own limit


@dataclass(frozen=True)
class CachePoint:
    digest: str  # of the prompt up to here, cache_control markers left out
    tokens: int  # the prompt's tokens up to here
    ttl_s: float = DEFAULT_TTL_S


@dataclass(frozen=True)
class CacheUse:
    read_tokens: int = 0
    write_tokens: int = 0


class PromptCache:
    """The prefixes seen, each until its expiry; least recently used first out."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[Hashable, str], float] = OrderedDict()

    def settle(
        self, scope: Hashable, points: tuple[CachePoint, ...], *, min_tokens: int, step: int
    ) -> CacheUse:
        """Read the longest prefix cached, store every point of at least ``min_tokens``. ``step``:
        0 writes the prompt up to its last point (Anthropic); else what was read is rounded down to
        ``min_tokens`` plus whole steps, and nothing is written (OpenAI)."""
        now = self._clock()
        cacheable = [p for p in points if p.tokens >= min_tokens]
        read = 0
        for point in cacheable:
            key = (scope, point.digest)
            expires = self._entries.get(key)
            if expires is not None and expires > now:
                read = max(read, point.tokens)
        for point in cacheable:  # stored, or their lifetime renewed by this use
            key = (scope, point.digest)
            self._entries[key] = now + point.ttl_s
            self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if step:
            if read < min_tokens:
                return CacheUse()
            return CacheUse(read_tokens=min_tokens + (read - min_tokens) // step * step)
        last = cacheable[-1].tokens if cacheable else 0
        return CacheUse(read_tokens=read, write_tokens=max(last - read, 0))

    def clear(self) -> None:
        self._entries.clear()


def anthropic_points(payload: Mapping[str, Any]) -> tuple[CachePoint, ...]:
    """The breakpoints of a Messages request, in prompt order (tools, system, messages).

    Raises ValueError when there are more than Anthropic allows.
    """
    tools = _list(payload.get("tools"))
    system = payload.get("system")
    messages = [m for m in _list(payload.get("messages")) if isinstance(m, Mapping)]
    auto = payload.get("cache_control")
    points: list[CachePoint] = []
    for i, tool in enumerate(tools):
        if _marked(tool):
            points.append(_point([payload.get("model"), tools[: i + 1]], REPLY_PRIMING_TOKENS, tool))
    head = REPLY_PRIMING_TOKENS
    if isinstance(system, list):
        for k, block in enumerate(system):
            if _marked(block):
                tokens = head + PER_MESSAGE_TOKENS + content_tokens(system[: k + 1])
                points.append(_point([payload.get("model"), tools, system[: k + 1]], tokens, block))
    if system is not None and system != "" and system != []:
        head += PER_MESSAGE_TOKENS + content_tokens(system)
    for i, message in enumerate(messages):
        content = message.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for j, block in enumerate(blocks):
            last = i == len(messages) - 1 and j == len(blocks) - 1
            marker = block if _marked(block) else {"cache_control": auto} if last and auto else None
            if marker is None:
                continue
            upto = {**message, "content": blocks[: j + 1]}
            tokens = head + PER_MESSAGE_TOKENS + content_tokens(blocks[: j + 1])
            points.append(_point([payload.get("model"), tools, system, messages[:i], upto], tokens, marker))
        head += PER_MESSAGE_TOKENS + content_tokens(content)
    if len(points) > MAX_BREAKPOINTS:
        raise ValueError(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(points)}."
        )
    return tuple(points)


def openai_points(payload: Mapping[str, Any]) -> tuple[CachePoint, ...]:
    """Every message and content-part boundary of a Chat Completions prompt, in order."""
    seed = [payload.get("model"), payload.get("tools")]
    points: list[CachePoint] = []
    tokens = REPLY_PRIMING_TOKENS
    messages = _list(payload.get("messages"))
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        tokens += PER_MESSAGE_TOKENS
        if isinstance(content, list):
            for j in range(len(content) - 1):  # the last part ends with its message, below
                upto = {**message, "content": content[: j + 1]}
                points.append(_point([*seed, messages[:i], upto], tokens + content_tokens(content[: j + 1])))
        tokens += content_tokens(content)
        if message.get("tool_calls"):
            tokens += content_tokens(json.dumps(message["tool_calls"]))
        points.append(_point([*seed, messages[: i + 1]], tokens))
    return tuple(points)


def _point(prefix: list[Any], tokens: int, marker: Mapping[str, Any] | None = None) -> CachePoint:
    text = json.dumps(_unmarked(prefix), sort_keys=True, separators=(",", ":"), default=str)
    control = marker.get("cache_control") if marker is not None else None
    ttl = control.get("ttl") if isinstance(control, Mapping) else None
    return CachePoint(hashlib.sha256(text.encode()).hexdigest(), tokens, _TTLS_S.get(str(ttl), DEFAULT_TTL_S))


def _unmarked(value: Any) -> Any:
    """``value`` without its cache_control markers: a breakpoint moved is the same prompt."""
    if isinstance(value, Mapping):
        return {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value


def _marked(block: Any) -> bool:
    return isinstance(block, Mapping) and isinstance(block.get("cache_control"), Mapping)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
