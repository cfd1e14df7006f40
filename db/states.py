"""The closed sets of states a batch, a request and an attempt can be in."""

from __future__ import annotations

from enum import StrEnum


class Priority(StrEnum):
    INTERACTIVE = "interactive"
    DEFAULT = "default"
    BULK = "bulk"


class BatchStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"  # cancel asked; calls in flight are finishing
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


TERMINAL_REQUEST_STATUSES = frozenset(
    {RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED, RequestStatus.EXPIRED}
)


ENDED_BATCH_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.CANCELLED, BatchStatus.EXPIRED, BatchStatus.FAILED}
)


class AttemptOutcome(StrEnum):
    """How one provider call ended. For a failed call it is the policy's decision
    (``workers.policy.decide``): the one vocabulary of what happens next."""

    IN_FLIGHT = "in_flight"  # written before the call; a crash leaves it so
    SUCCESS = "success"
    RETRY = "retry"  # failed; the same deployment may be tried again, after a backoff
    FALL_BACK = "fallback"  # failed; the next deployment of the chain is tried
    FAIL = "fail"  # failed; the request's own fault, not retried anywhere: it ends failed
    LOST = "lost"  # its run died mid-call; cost estimated
    CACHE_HIT = "cache_hit"  # no call: a cached answer served (workers/answer_cache.py), cost 0
    COALESCED = "coalesced"  # no call: the answer of an identical request in flight, cost 0


FAILED_CALL_DECISIONS = (AttemptOutcome.RETRY, AttemptOutcome.FALL_BACK, AttemptOutcome.FAIL)
