"""Batches past their completion window: what still waits in the queue ends ``expired`` now
(running requests stop before their next call), so that a batch ends on time whatever the queue."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.batch_state import OPEN_BATCH_STATUSES, end_queued_requests
from db.engine import Database
from db.models import Batch
from db.states import RequestStatus
from db.types import utcnow

EXPIRED = {"kind": "expired", "message": "the batch's completion window passed before this request ran"}


def expire_batches(db: Database, limit: int = 100) -> int:
    """Expire the queued requests of every open batch past its window; returns how many batches."""
    with db.session() as session:
        due = list(
            session.scalars(
                select(Batch.id)
                .where(Batch.status.in_(OPEN_BATCH_STATUSES), Batch.expires_at <= utcnow())
                .limit(limit)
            )
        )
    for batch_id in due:

        def unit(session: Session, batch_id: str = batch_id) -> None:
            batch = session.get(Batch, batch_id, with_for_update=True)
            if batch is None or batch.status not in OPEN_BATCH_STATUSES:
                return
            end_queued_requests(session, batch, RequestStatus.EXPIRED, utcnow(), EXPIRED)

        db.transact(unit)
    return len(due)
