"""A route's input budget: what trimming keeps, what it drops, and when it cannot fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.input_budget import fit


def words(body: Mapping[str, Any]) -> int:
    """A stand-in estimate: one token per word."""
    return sum(len(str(m.get("content", "")).split()) for m in body["messages"])


def msg(role: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": " ".join(["w"] * n), **extra}


def test_a_body_within_the_budget_is_left_as_it_is() -> None:
    body = {"model": "m", "messages": [msg("user", 5)]}
    fitted = fit(body, 10, words)
    assert fitted is not None and fitted.body == body and fitted.dropped == 0 and fitted.estimated_tokens == 5


def test_system_messages_and_the_latest_turns_are_kept_the_oldest_dropped() -> None:
    system, late = msg("system", 3), msg("user", 2, name="late")
    body = {
        "messages": [system, msg("user", 5), msg("assistant", 5), msg("user", 4), msg("assistant", 1), late]
    }
    fitted = fit(body, 11, words)
    assert fitted is not None and fitted.dropped == 2
    assert fitted.body["messages"] == [system, msg("user", 4), msg("assistant", 1), late]


def test_a_trimmed_conversation_never_starts_with_an_assistant_turn_or_orphan_tool_results() -> None:
    call = msg("assistant", 1, tool_calls=[{"id": "t1"}])
    body = {"messages": [msg("user", 9), call, msg("tool", 1, tool_call_id="t1"), msg("user", 2)]}
    fitted = fit(body, 5, words)
    assert fitted is not None and fitted.body["messages"] == [msg("user", 2)] and fitted.dropped == 3


def test_when_even_the_system_messages_and_the_last_turn_are_over_nothing_fits() -> None:
    body = {"messages": [msg("system", 8), msg("user", 1), msg("user", 4)]}
    assert fit(body, 10, words) is None
