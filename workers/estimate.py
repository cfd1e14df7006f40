"""Offline prompt-size estimates: no tokenizer download, no network, good to within tens of percent.

A character heuristic (about four characters per token in English text, plus a few tokens of
framing per message) is what OpenAI itself uses for admission. It is used where a count is needed
before the provider says the truth: estimated cost of a call whose worker died, and (later) the
token bucket's admission charge.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return json.dumps(content)


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a canonical (Chat Completions) body."""
    total = TOKENS_PER_REPLY
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE + math.ceil(len(_text_of(message.get("content"))) / CHARS_PER_TOKEN)
        if message.get("tool_calls"):
            total += math.ceil(len(json.dumps(message["tool_calls"])) / CHARS_PER_TOKEN)
    if body.get("tools"):
        total += math.ceil(len(json.dumps(body["tools"])) / CHARS_PER_TOKEN)
    return total


def requested_max_tokens(body: Mapping[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(value) if isinstance(value, int) and value > 0 else default
