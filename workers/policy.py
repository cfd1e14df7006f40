"""What to do after a provider call failed: the one place where that is decided.

Every failure lands in a small closed set of decisions, which is also how the failed attempt is
recorded (``db.states.AttemptOutcome``): one vocabulary from the policy to the ledger.

- ``RETRY``: the same deployment again, after a backoff (429, 408, 409, 5xx, 529, timeouts,
  connection errors): the provider is busy or flaky, not wrong.
- ``FALL_BACK``: the next deployment in the route's chain (this deployment cannot answer this
  request: its model is gone, its key is refused, its context window is too small, it answered
  something unreadable, or its retries are spent).
- ``FAIL``: the request's own fault (400, 413, 422, or it cannot be translated): no deployment
  would do better, so it is not retried anywhere.
"""

from __future__ import annotations

import random
from typing import Final, Literal

from db.states import AttemptOutcome
from workers.providers.base import CallFailed

RETRY: Final = AttemptOutcome.RETRY
FALL_BACK: Final = AttemptOutcome.FALL_BACK
FAIL: Final = AttemptOutcome.FAIL
Decision = Literal[AttemptOutcome.RETRY, AttemptOutcome.FALL_BACK, AttemptOutcome.FAIL]


_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_LENGTH_WORDS = ("prompt is too long", "context length", "context window", "maximum context")


def is_context_length(failure: CallFailed) -> bool:
    if failure.error_code in _CONTEXT_LENGTH_CODES:
        return True
    message = failure.message.lower()
    return any(word in message for word in _CONTEXT_LENGTH_WORDS)


def decide(failure: CallFailed) -> Decision:
    """The next step after ``failure``, from its kind, status and the provider's error type."""
    if failure.kind in ("timeout", "connection"):
        return RETRY
    if failure.kind == "translation":
        return FAIL  # the request asks for something this provider cannot express
    if failure.kind in ("invalid_reply", "unavailable"):
        return FALL_BACK
    status = failure.status or 0
    if status == 429 and failure.error_code == "insufficient_quota":
        return FALL_BACK  # the account is out of money: waiting will not help
    if status in (408, 409, 429) or status >= 500:
        return RETRY  # busy, overloaded or flaky: 529 is Anthropic's "overloaded"
    if status == 400 and is_context_length(failure):
        return FALL_BACK  # a deployment with a larger window may fit it
    if status in (401, 402, 403, 404):
        return FALL_BACK  # this deployment's key or model is the problem, not the request
    return FAIL  # 400, 413, 422 and the rest of 4xx: the request's own fault


def backoff_s(retry_no: int, *, base_s: float, max_s: float, retry_after_s: float | None = None) -> float:
    """Exponential backoff with full jitter, but never sooner than the provider asked."""
    ceiling = min(max_s, base_s * 2**retry_no)
    jittered = random.uniform(0, ceiling)
    return max(jittered, retry_after_s or 0.0)
