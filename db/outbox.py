"""Committed requests whose task message may not have been published (the outbox).

The API commits a batch before it publishes, so a crash or a broker outage between the two
leaves rows with ``published_at IS NULL``. The publisher sweep finds them here and publishes
them; nothing accepted is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker_config.publisher import publish_requests
from db.engine import Database
from db.models import LlmRequest
from db.states import RequestStatus
from db.types import utcnow

PUBLISH_CHUNK = 1000


def unpublished(session: Session, *, created_before: datetime, limit: int) -> list[tuple[str, str]]:
    """Up to ``limit`` queued, never-published requests older than the publish grace."""
    rows = session.execute(
        select(LlmRequest.id, LlmRequest.priority)
        .where(
            LlmRequest.status == RequestStatus.QUEUED,
            LlmRequest.published_at.is_(None),
            LlmRequest.created_at < created_before,
        )
        .order_by(LlmRequest.id)
        .limit(limit)
    ).all()
    return [(row.id, row.priority) for row in rows]


def mark_published(session: Session, request_ids: Sequence[str], at: datetime) -> None:
    if request_ids:
        session.execute(
            update(LlmRequest)
            .where(LlmRequest.id.in_(request_ids), LlmRequest.published_at.is_(None))
            .values(published_at=at)
        )


def publish_pending(db: Database, requests: Sequence[tuple[str, str]]) -> int:
    """Publish, then mark published, chunk by chunk; returns how many were published.

    Publish-then-mark: a crash between the two publishes a chunk twice at worst (redeliveries are
    idempotent), never zero times. A broker error stops here and leaves the rest for the sweep.
    """
    done = 0
    for start in range(0, len(requests), PUBLISH_CHUNK):
        chunk = requests[start : start + PUBLISH_CHUNK]
        publish_requests(chunk)
        ids = [request_id for request_id, _ in chunk]

        def mark(session: Session, ids: list[str] = ids) -> None:
            mark_published(session, ids, utcnow())

        db.transact(mark)
        done += len(chunk)
    return done
