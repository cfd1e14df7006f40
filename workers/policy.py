"""What to do after a provider call failed: the one place where that is decided.

Every failure lands in a small closed set of next steps:

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
from enum import StrEnum

from workers.providers.base import CallFailed


class Step(StrEnum):
    RETRY = "retry"
    FALL_BACK = "fallback"
    FAIL = "fail"


_CONTEXT_LENGTH_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_CONTEXT_LENGTH_WORDS = ("prompt is too long", "context length", "context window", "maximum context")


def is_context_length(failure: CallFailed) -> bool:
    if failure.error_code in _CONTEXT_LENGTH_CODES:
        return True
    message = failure.message.lower()
    return any(word in message for word in _CONTEXT_LENGTH_WORDS)


def classify(failure: CallFailed) -> Step:
    """The next step after ``failure``, from its kind, status and the provider's error type."""
    if failure.kind in ("timeout", "connection"):
        return Step.RETRY
    if failure.kind == "translation":
        return Step.FAIL  # the request asks for something this provider cannot express
    if failure.kind in ("invalid_reply", "unavailable"):
        return Step.FALL_BACK
    status = failure.status or 0
    if status == 429 and failure.error_code == "insufficient_quota":
        return Step.FALL_BACK  # the account is out of money: waiting will not help
    if status in (408, 409, 429) or status >= 500:
        return Step.RETRY  # busy, overloaded or flaky: 529 is Anthropic's "overloaded"
    if status == 400 and is_context_length(failure):
        return Step.FALL_BACK  # a deployment with a larger window may fit it
    if status in (401, 402, 403, 404):
        return Step.FALL_BACK  # this deployment's key or model is the problem, not the request
    return Step.FAIL  # 400, 413, 422 and the rest of 4xx: the request's own fault


def backoff_s(retry_no: int, *, base_s: float, max_s: float, retry_after_s: float | None = None) -> float:
    """Exponential backoff with full jitter, but never sooner than the provider asked."""
    ceiling = min(max_s, base_s * 2**retry_no)
    jittered = random.uniform(0, ceiling)
    return max(jittered, retry_after_s or 0.0)
