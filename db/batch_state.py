"""How a batch moves to its end, shared by the workers (a request ends) and the API (cancel).

Every function here runs inside the caller's transaction, with the batch row locked.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import Session

from db.models import Batch, LlmRequest
from db.states import BatchStatus, RequestStatus
from db.webhooks import enqueue_batch_event

OPEN_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)


def count_request_end(
    session: Session, batch: Batch, status: RequestStatus, now: datetime, n: int = 1
) -> None:
    """Count ``n`` requests that ended with ``status`` on their batch; end the batch if that was all."""
    counter = f"{status.value}_count"
    setattr(batch, counter, getattr(batch, counter) + n)
    finish_if_done(session, batch, now)


def finish_if_done(session: Session, batch: Batch, now: datetime) -> bool:
    """End the batch once every request has ended, and queue its webhook event."""
    ended = batch.succeeded_count + batch.failed_count + batch.cancelled_count + batch.expired_count
    if ended < batch.total_count or batch.status not in OPEN_BATCH_STATUSES:
        return False
    if batch.cancelled_at is not None:
        batch.status = BatchStatus.CANCELLED
    elif batch.expired_count:
        batch.status = BatchStatus.EXPIRED
    else:
        batch.status = BatchStatus.COMPLETED
    batch.ended_at = now
    enqueue_batch_event(session, batch, now)
    return True


def end_queued_requests(
    session: Session, batch: Batch, status: RequestStatus, now: datetime, error: dict[str, Any]
) -> int:
    """End every request of the batch still waiting its turn (cancel, expiry); running ones finish
    by themselves. Returns how many were ended."""
    result = session.execute(
        update(LlmRequest)
        .where(LlmRequest.batch_id == batch.id, LlmRequest.status == RequestStatus.QUEUED)
        .values(status=status.value, ended_at=now, error=error, owner=None)
        .execution_options(synchronize_session=False)
    )
    ended = int(cast(CursorResult[Any], result).rowcount)
    count_request_end(session, batch, status, now, n=ended)
    return ended
