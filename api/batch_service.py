"""The one batch service: the native, OpenAI and Anthropic front doors all translate to it."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import redis
import structlog
from kombu.exceptions import KombuError as BrokerError
from sqlalchemy import case, func, insert, select
from sqlalchemy.orm import Session

from api.batch_input import BatchLine
from api.errors import ApiError, not_found
from broker_config import metrics, tracing
from db.batch_state import OPEN_BATCH_STATUSES, counted, end_queued_requests, finish_if_done
from db.engine import Database
from db.ids import new_id
from db.models import Batch, LlmRequest
from db.outbox import publish_pending, publishing, unpublished
from db.prompts import prompt_hash
from db.states import BatchStatus, Priority, RequestStatus
from db.types import format_usd, utcnow

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger(__name__)
INSERT_CHUNK = 2000
RESULTS_CHUNK = 1000
CANCELLED = {"kind": "cancelled", "message": "the batch was cancelled before this request ran"}


@dataclass(frozen=True)
class BatchSpec:
    """Everything about a new batch but its lines."""

    tenant_id: str
    priority: Priority
    metadata: dict[str, Any] | None
    completion_window_s: int
    api: str = "native"
    endpoint: str | None = None
    input_file_id: str | None = None
    webhook_url: str | None = None
    # The batch's attribution tags (its metadata among the attribution keys): every request's,
    # unless its line sets its own.
    tags: dict[str, str] = field(default_factory=dict)


def _new_batch(spec: BatchSpec, now: datetime, status: BatchStatus, *, total: int, failed: int) -> Batch:
    return Batch(
        id=new_id("batch"),
        tenant_id=spec.tenant_id,
        status=status,
        priority=spec.priority,
        metadata_=spec.metadata,
        created_at=now,
        expires_at=now + timedelta(seconds=spec.completion_window_s),
        total_count=total,
        succeeded_count=0,
        failed_count=failed,
        cancelled_count=0,
        expired_count=0,
        input_tokens=0,
        output_tokens=0,
        cost_usd=Decimal(0),
        unpriced_attempts=0,
        api=spec.api,
        endpoint=spec.endpoint,
        input_file_id=spec.input_file_id,
        webhook_url=spec.webhook_url,
    )


def create_batch(db: Database, spec: BatchSpec, lines: Sequence[BatchLine], *, publish: bool = True) -> Batch:
    """Commit the batch and every request, then (unless ``publish`` is False: the caller will
    call ``publish_batch`` later) publish them. Returns once all are persisted.

    If the broker is down the batch is still accepted: its requests wait in the ledger and the
    publisher sweep sends them when the broker is back.
    """
    now = utcnow()
    failed = sum(1 for line in lines if line.error is not None)
    batch = _new_batch(spec, now, BatchStatus.IN_PROGRESS, total=len(lines), failed=failed)
    # This runs in a worker thread with a copy of the request's context: bound for this request only.
    structlog.contextvars.bind_contextvars(batch_id=batch.id, tenant=spec.tenant_id)
    ids = [new_id("req") for _ in lines]
    rows = [
        {
            "id": request_id,
            "batch_id": batch.id,
            "line_no": line.line_no,
            "custom_id": line.custom_id,
            "model": line.model,
            "body": line.body,
            "tags": spec.tags | (line.tags or {}),
            "prompt_hash": prompt_hash(line.model, line.body),
            "priority": spec.priority.value,
            "status": (RequestStatus.QUEUED if line.error is None else RequestStatus.FAILED).value,
            "error": line.error,
            "ended_at": None if line.error is None else now,
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
            session.execute(insert(LlmRequest), rows[start : start + INSERT_CHUNK])
        finish_if_done(session, batch, now)  # every line was refused already

    db.transact(unit)
    metrics.batches_accepted.labels(spec.api).inc()
    metrics.requests_accepted.labels(spec.priority.value).inc(len(lines))
    for line in lines:
        if line.error is not None:  # refused at the door: ended before it was queued
            metrics.requests_ended.labels(line.model, spec.priority.value, RequestStatus.FAILED.value).inc()
    if publish:
        runnable = [
            (request_id, spec.priority.value)
            for request_id, line in zip(ids, lines, strict=True)
            if line.error is None
        ]
        _publish(db, batch.id, runnable)
    return batch


def _publish(
    db: Database,
    batch_id: str,
    requests: Sequence[tuple[str, str]],
    on_chunk: Callable[[], None] | None = None,
) -> None:
    try:
        publish_pending(db, requests, on_chunk)
    except (BrokerError, redis.RedisError, OSError) as exc:
        log.warning("batch accepted, not yet published: the sweep will", batch_id=batch_id, error=str(exc))


def publish_batch(
    db: Database, batch_id: str, client: redis.Redis, trace: Mapping[str, Any] | None = None
) -> None:
    """Publish the batch's requests that are not yet published (after ``publish=False``), holding
    the batch's publishing claim so that the publisher sweep does not publish them too. ``trace``:
    the accepting span's context (``tracing.inject``), which the messages carry on."""
    with publishing(client, batch_id) as refresh, tracing.attached(trace):
        _publish_unpublished(db, batch_id, refresh)


def accept_span(spec: BatchSpec, requests: int) -> AbstractContextManager[Span | None]:
    """The span of a batch's accept, when traces are on (broker_config/tracing.py); the messages
    published inside it carry its context to the workers."""
    attributes = {
        "headrace.batch.request_count": requests,
        "headrace.priority": spec.priority.value,
        "headrace.tenant": spec.tenant_id,
        "headrace.api": spec.api,
    }
    return tracing.span("headrace.batch.accept", kind="producer", attributes=attributes)


def _publish_unpublished(db: Database, batch_id: str, refresh: Callable[[], None]) -> None:
    after = ""
    while True:
        with db.session() as session:
            rows = unpublished(
                session, created_before=None, limit=INSERT_CHUNK * 5, batch_id=batch_id, after=after
            )
        if not rows:
            return
        _publish(db, batch_id, rows, refresh)
        after = rows[-1][0]


def record_failed_batch(db: Database, spec: BatchSpec, errors: list[dict[str, Any]]) -> Batch:
    """A batch refused after it was created (the OpenAI API's way): failed, with the reasons."""
    now = utcnow()
    batch = _new_batch(spec, now, BatchStatus.FAILED, total=0, failed=0)
    batch.ended_at, batch.errors = now, errors
    db.transact(lambda session: session.add(batch))
    return batch


def cancel_batch(db: Database, tenant_id: str, batch_id: str) -> Batch:
    """Stop what has not started: queued requests end ``cancelled`` now; running ones finish.
    Cancelling an ended batch is refused; cancelling twice is harmless."""

    def unit(session: Session) -> tuple[Batch, Counter[tuple[str, str]]]:
        # Read, not locked: the batch row is locked last, by the statement that counts the
        # cancelled requests and marks it (requests before batch, as every writer does).
        batch = session.get(Batch, batch_id)
        if batch is None or batch.tenant_id != tenant_id:
            raise not_found("batch", batch_id)
        if batch.status not in OPEN_BATCH_STATUSES:
            raise ApiError(400, "invalid_request", f"batch {batch_id} has already ended ({batch.status})")
        now = utcnow()
        mark = {
            "cancelled_at": func.coalesce(Batch.cancelled_at, now),
            "status": case(
                (Batch.status == BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING), else_=Batch.status
            ),
        }
        ended = end_queued_requests(session, batch_id, RequestStatus.CANCELLED, now, CANCELLED, also=mark)
        session.refresh(batch)
        counted(session, [batch])
        return batch, ended

    batch, ended = db.transact(unit)
    for (route, priority), count in ended.items():
        metrics.requests_ended.labels(route, priority, RequestStatus.CANCELLED.value).inc(count)
    return batch


def get_batch(session: Session, tenant_id: str, batch_id: str) -> Batch:
    """The tenant's batch; another tenant's batch is as unknown as a missing one."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.tenant_id != tenant_id:
        raise not_found("batch", batch_id)
    counted(session, [batch])
    return batch


def list_batches(
    session: Session,
    tenant_id: str,
    *,
    limit: int,
    after: str | None = None,
    before: str | None = None,
    api: str | None = None,
    exclude_deleted: bool = False,
) -> tuple[list[Batch], bool]:
    """Newest first. ``after``: the last id of the previous page (older ones follow); ``before``:
    the first id of the next page (newer ones). Ids sort by creation time. Deleted batches are
    left out by the query itself when asked: filtered after the LIMIT, a page of them would come
    back empty with has_more and no last id, and a client's pagination would stop there."""
    query = select(Batch).where(Batch.tenant_id == tenant_id)
    if api:
        query = query.where(Batch.api == api)
    if exclude_deleted:
        query = query.where(Batch.deleted_at.is_(None))
    if before:
        newer = list(session.scalars(query.where(Batch.id > before).order_by(Batch.id).limit(limit + 1)))
        page = list(reversed(newer[:limit]))
        counted(session, page)
        return page, len(newer) > limit
    if after:
        query = query.where(Batch.id < after)
    found = list(session.scalars(query.order_by(Batch.id.desc()).limit(limit + 1)))
    counted(session, found[:limit])
    return found[:limit], len(found) > limit


def result_line(request: LlmRequest) -> dict[str, Any]:
    """The native result line."""
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
        **(request.notes or {}),  # e.g. "trimmed_messages": what a route's input budget dropped
        # Answered without a call of its own ("cached" or "coalesced" in its notes): what it saved.
        **({"saved_cost_usd": format_usd(request.saved_cost_usd)} if request.served_from else {}),
    }


def iter_requests(
    db: Database, batch_id: str, statuses: Sequence[str] | None = None
) -> Iterator[list[LlmRequest]]:
    """The batch's requests in input order, a chunk per read: memory stays flat for any size."""
    last_line = 0
    while True:
        query = select(LlmRequest).where(LlmRequest.batch_id == batch_id, LlmRequest.line_no > last_line)
        if statuses is not None:
            query = query.where(LlmRequest.status.in_(statuses))
        with db.session() as session:
            chunk = list(session.scalars(query.order_by(LlmRequest.line_no).limit(RESULTS_CHUNK)))
        if not chunk:
            return
        yield chunk
        last_line = chunk[-1].line_no


def iter_jsonl(
    db: Database,
    batch_id: str,
    line: Callable[[LlmRequest], dict[str, Any]],
    statuses: Sequence[str] | None = None,
) -> Iterator[bytes]:
    """JSONL of ``line(request)`` for each request, streamed."""
    for chunk in iter_requests(db, batch_id, statuses):
        yield b"".join(json.dumps(line(r), separators=(",", ":")).encode() + b"\n" for r in chunk)


def iter_results(db: Database, batch_id: str) -> Iterator[bytes]:
    """The native results: one line per request in input order."""
    return iter_jsonl(db, batch_id, result_line)
