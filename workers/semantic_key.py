"""What a semantic cache compares: the last question by meaning, everything else exactly.

A chat request splits in two:

- ``text``, the one thing compared by meaning: the text of the final user turn.
- ``params_hash``, everything else, which must match exactly: the system prompt, every earlier
  turn, the final turn's other fields (``name``), and the non-message parameters (temperature,
  max_tokens, tools, response_format, seed, ...). It is ``workers.answer_cache.request_hash`` of
  the body with the final turn's content taken out, so it leaves out what the exact key leaves
  out (who asked, how the answer travels) and nothing more.

Why not embed the system prompt and the earlier turns with the question: an embedding here is the
mean of its tokens' rows, so a long shared system prompt would outweigh a short question and make
every question of one app look alike (false hits), and a follow-up ("and in Germany?") means
something else in each conversation. Two requests are candidates only when they are the same
conversation so far with the final question worded differently; a changed system prompt or
parameter starts another index (``workers.semantic_index.Scope``).

A request has no semantic key (None) when its last turn is not the user's, when that turn carries
anything but text (an image's meaning is not in the words), when its text is empty, or when it is
longer than ``max_chars``: a long document averages into a vague vector that resembles every other
long document on its topic, so only the exact cache serves those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workers.answer_cache import request_hash

MAX_TEXT_CHARS = 2000


@dataclass(frozen=True)
class SemanticKey:
    text: str  # the final user turn, compared by meaning
    params_hash: str  # SHA-256 hex of everything else, compared exactly


def semantic_key(body: Mapping[str, Any], *, max_chars: int = MAX_TEXT_CHARS) -> SemanticKey | None:
    """The request's semantic key, or None when only an exact match may serve it."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "user":
        return None
    text = _plain_text(last.get("content"))
    if text is None or not text.strip() or len(text) > max_chars:
        return None
    rest = {**body, "messages": [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]}
    return SemanticKey(text=text, params_hash=request_hash(rest))


def _plain_text(content: Any) -> str | None:
    """A turn's text when it is only text (a string, or text parts joined by newlines), else None."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            return None
    return "\n".join(texts)
