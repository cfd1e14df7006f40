"""The one batch service: the native, OpenAI and Anthropic front doors all translate to it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

import redis
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from api.batch_input import BatchLine
from api.errors import not_found
from db.engine import Database
from db.ids import new_id
from db.models import Batch, Request
from db.outbox import publish_pending
from db.states import BatchStatus, Priority, RequestStatus
from db.types import format_usd, utcnow

log = logging.getLogger(__name__)
INSERT_CHUNK = 1000
RESULTS_CHUNK = 500


def create_batch(
    db: Database,
    *,
    tenant_id: str,
    lines: Sequence[BatchLine],
    priority: Priority,
    metadata: dict[str, Any] | None,
    completion_window_s: int,
) -> Batch:
    """Commit the batch and every request, then publish them. Returns once all are persisted.

    If the broker is down the batch is still accepted: its requests wait in the ledger and the
    publisher sweep sends them when the broker is back.
    """
    now = utcnow()
    batch = Batch(
        id=new_id("batch"),
        tenant_id=tenant_id,
        status=BatchStatus.IN_PROGRESS,
        priority=priority,
        metadata_=metadata,
        created_at=now,
        expires_at=now + timedelta(seconds=completion_window_s),
        total_count=len(lines),
        succeeded_count=0,
        failed_count=0,
        cancelled_count=0,
        expired_count=0,
        input_tokens=0,
        output_tokens=0,
        cost_usd=Decimal(0),
        unpriced_attempts=0,
    )
    ids = [new_id("req") for _ in lines]
    rows = [
        {
            "id": request_id,
            "batch_id": batch.id,
            "line_no": line.line_no,
            "custom_id": line.custom_id,
            "model": line.model,
            "body": line.body,
            "priority": priority.value,
            "status": RequestStatus.QUEUED.value,
            "attempt_count": 0,
            "deliveries": 0,
            "input_tokens": 0,
            "output_tokens": 0,
            "cost_usd": Decimal(0),
            "created_at": now,
        }
        for request_id, line in zip(ids, lines, strict=True)
    ]

    def unit(session: Session) -> None:
        session.add(batch)
        session.flush()
        for start in range(0, len(rows), INSERT_CHUNK):
            session.execute(insert(Request), rows[start : start + INSERT_CHUNK])

    db.transact(unit)
    try:
        publish_pending(db, [(request_id, priority.value) for request_id in ids])
    except (BrokerError, redis.RedisError, OSError) as exc:
        log.warning("batch %s accepted but not yet published (%s); the sweep will publish it", batch.id, exc)
    return batch


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    """The tenant's batch; another tenant's batch is as unknown as a missing one."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise not_found("batch", batch_id)
    return batch


def list_batches(
    session: Session, tenant_id: str, *, limit: int, after: str | None
) -> tuple[list[Batch], bool]:
    """Newest first; ``after`` is the last id of the previous page. Ids sort by creation time."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if after:
        query = query.where(Batch.id < after)
    found = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
    return found[:limit], len(found) > limit


def result_line(request: Request) -> dict[str, Any]:
    return {
        "id": request.id,
        "custom_id": request.custom_id,
        "status": request.status,
        "response": {"status_code": 200, "body": request.response} if request.response is not None else None,
        "error": request.error,
        "deployment": request.deployment,
        "attempts": request.attempt_count,
        "usage": {"input_tokens": request.input_tokens, "output_tokens": request.output_tokens},
        "cost_usd": format_usd(request.cost_usd),
    }


def iter_results(db: Database, batch_id: str) -> Iterator[bytes]:
    """JSONL, one line per request in input order, read in chunks: memory stays flat."""
    last_line = 0
    while True:
        with db.session() as session:
            chunk = list(
                session.scalars(
                    select(Request)
                    .where(Request.batch_id == batch_id, Request.line_no > last_line)
                    .order_by(Request.line_no)
                    .limit(RESULTS_CHUNK)
                )
            )
        if not chunk:
            return
        yield b"".join(json.dumps(result_line(r), separators=(",", ":")).encode() + b"\n" for r in chunk)
        last_line = chunk[-1].line_no
