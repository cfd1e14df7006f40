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

Two more rules decide what happens when a whole chain has been tried:

- **Provider trouble passes** (``passes``): 408, 409, 429, 5xx, 529, timeouts, cut or refused
  connections, unreadable replies, an open breaker, a paused deployment. A request that met only
  this waits in the delay queue, with backoff, and runs its chain again, for as long as its batch's
  window (or its route's ``deadline_s``) has time left; then it ends ``expired``, with the last
  error of each deployment, never ``failed`` for a fault that was not its own.
- **Money is protected by counting what may have been billed** (``may_have_billed``): a call the
  provider refused before doing any work (a refused connection, a connect timeout, 429, 503, 529)
  costs nothing and is not counted; anything else that got to the provider (a timeout while
  waiting for the answer, other 5xx, an unreadable reply) is counted against the request's
  ``max_attempts_per_request``, and a request that spends it ends ``failed``.
"""

from __future__ import annotations

import random
from typing import Any, Final, Literal

from broker_config.deployments import Deployment
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


# Answers that say the provider refused before doing any work: overloaded or rate limited.
_REFUSED_BEFORE_WORK = frozenset({429, 503, 529})


def passes(failure: CallFailed) -> bool:
    """Provider trouble that goes away by itself: worth waiting for while the window is open."""
    if failure.kind in ("timeout", "connection", "invalid_reply"):
        return True
    if failure.kind != "status":
        return False
    if failure.status == 429 and failure.error_code == "insufficient_quota":
        return False  # out of money: an operator must act
    return decide(failure) is RETRY


def may_have_billed(failure: CallFailed) -> bool:
    """Whether the provider may have charged for the call (see the module's docstring)."""
    if failure.kind in ("translation", "unavailable"):
        return False  # no call was made
    if failure.kind in ("timeout", "connection"):
        return failure.sent
    if failure.kind == "status":
        status = failure.status or 0
        return status >= 500 and status not in _REFUSED_BEFORE_WORK
    return True  # an unreadable 2xx reply: the work was done


def park_s(rounds: int, *, base_s: float, max_s: float) -> float:
    """How long a request that met only passing trouble waits before its chain runs again, after
    ``rounds`` earlier such waits: exponential with full jitter, at least ``base_s``."""
    return max(base_s, random.uniform(0, min(max_s, base_s * 2**rounds)))


def busy_park_s(soonest_s: float, expected_s: float | None, left_s: float) -> float:
    """How long a request every deployment was busy for waits in the delay queue: about until its
    turn in its deployment's line comes (``expected_s``, see ``workers.waiting_line``), so that it
    does not come back to find the same line; never less than the soonest a deployment may have
    room (``soonest_s``), and back before its deadline (``left_s`` away) for a last try."""
    if not expected_s:
        return soonest_s
    return max(soonest_s, min(expected_s, 0.9 * left_s))


def outcome_error(outcome: CallFailed, deployment: Deployment, attempt_no: int) -> dict[str, Any]:
    """The failure as the ledger keeps it, with the policy's two judgements of it."""
    return {
        **outcome.as_error(),
        "deployment": deployment.name,
        "attempt": attempt_no,
        "passes": passes(outcome),
        "may_have_billed": may_have_billed(outcome),
    }
