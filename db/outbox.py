"""Committed requests whose task message may not have been published (the outbox).

The API commits a batch before it publishes, so a crash or a broker outage between the two
leaves rows with ``published_at IS NULL``. The publisher sweep finds them here and publishes
them; nothing accepted is lost. A large batch is published after its answer, which can outlast
the sweep's grace (100,000 requests took 60 s on a busy PostgreSQL, and the sweep published 90%
of them a second time): its publisher holds ``keys.publishing`` meanwhile, and the sweep leaves
that batch alone until the key expires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from broker_config import keys
from broker_config.publisher import publish_requests
from db.engine import Database
from db.models import LlmRequest
from db.states import RequestStatus
from db.types import utcnow

PUBLISH_CHUNK = 1000


PUBLISHING_TTL_S = 30  # a publisher that stops refreshing its claim this long is gone


def _pending(created_before: datetime | None) -> tuple[Any, ...]:
    """Queued and never published (and committed before ``created_before``, when given)."""
    grace = () if created_before is None else (LlmRequest.created_at < created_before,)
    return (LlmRequest.status == RequestStatus.QUEUED, LlmRequest.published_at.is_(None), *grace)


def unpublished_batches(session: Session, *, created_before: datetime, limit: int) -> list[str]:
    """Batches with queued, never-published requests older than the publish grace."""
    query = select(LlmRequest.batch_id).where(*_pending(created_before)).distinct().limit(limit)
    return list(session.scalars(query))


def unpublished(
    session: Session, *, created_before: datetime | None, limit: int, batch_id: str, after: str = ""
) -> list[tuple[str, str]]:
    """Up to ``limit`` of the batch's queued, never-published requests (committed before
    ``created_before``, the publish grace, when given), in id order after ``after``."""
    rows = session.execute(
        select(LlmRequest.id, LlmRequest.priority)
        .where(*_pending(created_before), LlmRequest.batch_id == batch_id, LlmRequest.id > after)
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


def publish_pending(
    db: Database, requests: Sequence[tuple[str, str]], on_chunk: Callable[[], None] | None = None
) -> int:
    """Publish, then mark published, chunk by chunk; returns how many were published.
    ``on_chunk`` runs after each chunk (a publisher refreshes its claim there).

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
        if on_chunk is not None:
            on_chunk()
    return done


@contextmanager
def publishing(client: redis.Redis, batch_id: str) -> Iterator[Callable[[], None]]:
    """Hold the batch's publishing claim while the body runs; yields the refresh to call after
    each chunk. Best-effort: without Redis the publish goes on, and the sweep may publish part of
    the batch twice (redeliveries are idempotent)."""
    key, ttl_ms = keys.publishing(batch_id), PUBLISHING_TTL_S * 1000

    def refresh() -> None:
        with suppress(redis.RedisError):
            client.set(key, "1", px=ttl_ms)

    refresh()
    try:
        yield refresh
    finally:
        with suppress(redis.RedisError):
            client.delete(key)


def being_published(client: redis.Redis, batch_ids: Sequence[str]) -> set[str]:
    """The batches among ``batch_ids`` whose publisher holds its claim."""
    pipe = client.pipeline(transaction=False)
    for batch_id in batch_ids:
        pipe.exists(keys.publishing(batch_id))
    return {batch_id for batch_id, held in zip(batch_ids, pipe.execute(), strict=True) if held}
