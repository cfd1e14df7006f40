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
    IN_FLIGHT = "in_flight"  # written before the call; a crash leaves it so
    SUCCESS = "success"
    RETRY = "retry"  # failed; the same deployment was (or could be) tried again
    FALLBACK = "fallback"  # failed; the next deployment in the chain was tried
    FATAL = "fatal"  # failed; the request's own fault, not retried anywhere
    LOST = "lost"  # its worker died mid-call; cost estimated
