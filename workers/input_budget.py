"""A route's per-request input budget (``max_input_tokens``): refuse a request whose prompt is
estimated over it, or trim its conversation until it fits (``on_overflow = "trim"``).

Trimming keeps every system (and developer) message and the latest turns, and drops the oldest
others first. It never leaves a conversation a provider would refuse: one that starts with an
assistant turn, or with tool results whose call was dropped. The estimate is admission's own
(``workers.metering.estimate_prompt_tokens``), so what fits here is what the bucket reserves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

KEPT_ROLES = ("system", "developer")


@dataclass(frozen=True)
class Fitted:
    body: dict[str, Any]
    dropped: int  # messages trimmed away
    estimated_tokens: int  # of the body as it will be sent


def fit(
    body: Mapping[str, Any], max_tokens: int, estimate: Callable[[Mapping[str, Any]], int]
) -> Fitted | None:
    """The body within ``max_tokens``, trimmed as little as it takes; None when even its system
    messages and last turn alone are over."""
    messages = list(body.get("messages") or [])
    kept = [m for m in messages if isinstance(m, dict) and m.get("role") in KEPT_ROLES]
    turns = [m for m in messages if not (isinstance(m, dict) and m.get("role") in KEPT_ROLES)]
    dropped = 0
    while True:
        candidate = {**body, "messages": _in_order(messages, kept, turns)}
        tokens = estimate(candidate)
        if tokens <= max_tokens:
            return Fitted(candidate, dropped, tokens)
        if len(turns) <= 1:
            return None
        turns.pop(0)
        dropped += 1
        # A conversation starts with the user: no orphan tool results, no assistant turn first.
        while len(turns) > 1 and _role(turns[0]) in ("assistant", "tool"):
            turns.pop(0)
            dropped += 1


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _in_order(original: list[Any], kept: list[Any], turns: list[Any]) -> list[Any]:
    """The kept system messages and remaining turns, in the order the request had them."""
    keep = {id(m) for m in (*kept, *turns)}
    return [m for m in original if id(m) in keep]
