"""The simulator's own token arithmetic: what it bills and limits by, offline, no tokenizer.

A text is counted the way a BPE tokenizer splits English: each word (with its leading space) is
one token, or one per six letters when longer than eight; each group of up to three digits is one;
each run of punctuation one per two characters; a run of whitespace one. It is deliberately not
the character heuristic Headrace's workers estimate with (chars / 4), so that the estimate's
error is real and measurable, as it is against a real provider.

Prompt tokens = 3 (reply priming) + for each message: 4 (role and framing) + the tokens of its
content. A system prompt passed separately (Anthropic's top-level ``system``) counts as one more
message. Image, audio and document parts cost a flat
85 tokens each (OpenAI's low-detail image price) because their payloads say nothing about their
token cost. Tool calls and tool inputs count as the characters of their JSON.

Output tokens are words: the simulator's answers are made of N words and report N tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

PER_MESSAGE_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
MEDIA_PART_TOKENS = 85
_MEDIA_TYPES = frozenset({"image", "image_url", "input_image", "input_audio", "document", "file"})


_PIECES = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\w\s]+|_+|\s+")


def text_tokens(text: str) -> int:
    count = 0
    for piece in _PIECES.findall(text):
        core = piece.strip()
        if not core:
            count += 1  # a run of whitespace
        elif core[0].isdigit():
            count += 1
        elif core[0].isalpha():
            count += 1 if len(core) <= 8 else math.ceil(len(core) / 6)
        else:
            count += math.ceil(len(core) / 2)
    return count


def count_prompt_tokens(messages: Iterable[Mapping[str, Any]], system: Any = None) -> int:
    """Estimate the prompt tokens of OpenAI- or Anthropic-style messages (plus an optional system).

    Never raises on odd shapes: anything it does not recognise counts as its JSON text.
    """
    total = REPLY_PRIMING_TOKENS
    if system is not None and system != "" and system != []:
        total += PER_MESSAGE_TOKENS + content_tokens(system)
    for message in messages:
        total += PER_MESSAGE_TOKENS
        if not isinstance(message, Mapping):
            total += _json_tokens(message)
            continue
        total += content_tokens(message.get("content"))
        if message.get("tool_calls"):
            total += _json_tokens(message["tool_calls"])
    return total


def content_tokens(content: Any) -> int:
    """Tokens of a message's content: a string, a list of parts/blocks, or None."""
    if content is None:
        return 0
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        return sum(_part_tokens(part) for part in content)
    return _json_tokens(content)


def _part_tokens(part: Any) -> int:
    if isinstance(part, str):
        return text_tokens(part)
    if not isinstance(part, Mapping):
        return _json_tokens(part)
    kind = part.get("type")
    if kind in _MEDIA_TYPES:
        return MEDIA_PART_TOKENS
    if isinstance(part.get("text"), str):
        return text_tokens(part["text"])
    if kind == "tool_result":
        return content_tokens(part.get("content"))
    if kind == "tool_use":
        return text_tokens(str(part.get("name", ""))) + _json_tokens(part.get("input"))
    return _json_tokens(part)


def _json_tokens(value: Any) -> int:
    return text_tokens(json.dumps(value, default=str))


def message_text(content: Any) -> str:
    """The plain text of a message's content (text parts joined by newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        return "\n".join(texts)
    return ""
