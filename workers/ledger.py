"""The worker's writes to the ledger. Each function is one idempotent transaction.

Lock order everywhere: request, then attempt, then batch, so that two workers finishing
requests of one batch never deadlock on PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import Database
from db.models import Attempt, Batch, Request, Tenant
from db.states import TERMINAL_REQUEST_STATUSES, AttemptOutcome, BatchStatus, RequestStatus
from db.types import utcnow
from workers.providers.base import Usage

log = logging.getLogger(__name__)

# Cost of a call whose worker died: (deployment name, estimated input, estimated output) -> USD.
LostCostEstimator = Callable[[str, int, int], Decimal | None]


@dataclass(frozen=True)
class RunStart:
    request_id: str
    batch_id: str
    model: str
    body: dict[str, Any]
    priority: str
    expires_at: datetime
    tenant: str


@dataclass(frozen=True)
class AttemptResult:
    outcome: AttemptOutcome
    latency_ms: int
    http_status: int | None = None
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    error: dict[str, Any] | None = None
    provider_request_id: str | None = None


@dataclass(frozen=True)
class RequestEnd:
    status: RequestStatus
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    deployment: str | None = None


def _lock_request(session: Session, request_id: str) -> Request | None:
    return session.get(Request, request_id, with_for_update=True)


def _lock_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id, with_for_update=True)
    assert batch is not None, f"request of missing batch {batch_id}"
    return batch


def end_request(session: Session, request: Request, batch: Batch, end: RequestEnd, now: datetime) -> None:
    """Move a request to its final state and count it on its batch, exactly once."""
    if request.status in TERMINAL_REQUEST_STATUSES:
        return
    request.status = end.status
    request.response = end.response
    request.error = end.error
    request.deployment = end.deployment or request.deployment
    request.ended_at = now
    counter = f"{end.status.value}_count"
    setattr(batch, counter, getattr(batch, counter) + 1)
    ended = batch.succeeded_count + batch.failed_count + batch.cancelled_count + batch.expired_count
    if ended >= batch.total_count and batch.status == BatchStatus.IN_PROGRESS:
        if batch.cancelled_at is not None:
            batch.status = BatchStatus.CANCELLED
        elif batch.expired_count:
            batch.status = BatchStatus.EXPIRED
        else:
            batch.status = BatchStatus.COMPLETED
        batch.ended_at = now


def _mark_lost_attempts(
    session: Session,
    request: Request,
    batch: Batch,
    stale_before: datetime,
    estimate: LostCostEstimator,
    estimated_output_tokens: int,
) -> None:
    """Attempts left in flight by a dead worker get their cost row, marked estimated."""
    stale = session.scalars(
        select(Attempt)
        .where(
            Attempt.request_id == request.id,
            Attempt.outcome == AttemptOutcome.IN_FLIGHT,
            Attempt.started_at < stale_before,
        )
        .with_for_update()
    ).all()
    for attempt in stale:
        cost = estimate(attempt.deployment, attempt.estimated_input_tokens, estimated_output_tokens)
        attempt.outcome = AttemptOutcome.LOST
        attempt.cost_usd = cost
        attempt.cost_estimated = True
        attempt.input_tokens = attempt.estimated_input_tokens
        attempt.output_tokens = estimated_output_tokens
        attempt.error = {"kind": "lost", "message": "the worker making this call stopped before it ended"}
        _add_usage(request, batch, attempt.input_tokens, attempt.output_tokens, cost)
        log.warning(
            "request %s attempt %d lost with its worker; cost estimated", request.id, attempt.attempt_no
        )


def _add_usage(
    request: Request, batch: Batch, tokens_in: int, tokens_out: int, cost: Decimal | None, sign: int = 1
) -> None:
    """Count one call's tokens and cost on its request and batch (``sign=-1`` takes them back)."""
    request.input_tokens += sign * tokens_in
    request.output_tokens += sign * tokens_out
    batch.input_tokens += sign * tokens_in
    batch.output_tokens += sign * tokens_out
    if cost is None:
        batch.unpriced_attempts += sign
    else:
        request.cost_usd += sign * cost
        batch.cost_usd += sign * cost


def begin_run(
    db: Database,
    request_id: str,
    *,
    stale_attempt_s: float,
    estimate_lost: LostCostEstimator,
    estimated_output_tokens: Callable[[dict[str, Any]], int],
) -> RunStart | None:
    """Claim a delivered request. None when there is nothing to do (already ended, cancelled...)."""

    def unit(session: Session) -> RunStart | None:
        now = utcnow()
        request = _lock_request(session, request_id)
        if request is None:
            log.warning("request %s is not in the ledger; dropping its message", request_id)
            return None
        if request.status in TERMINAL_REQUEST_STATUSES:
            return None  # a redelivery of finished work: its result is already written once
        batch = _lock_batch(session, request.batch_id)
        _mark_lost_attempts(
            session,
            request,
            batch,
            now - timedelta(seconds=stale_attempt_s),
            estimate_lost,
            estimated_output_tokens(request.body),
        )
        if batch.cancelled_at is not None:
            end_request(session, request, batch, RequestEnd(RequestStatus.CANCELLED), now)
            return None
        if now >= batch.expires_at:
            end_request(session, request, batch, RequestEnd(RequestStatus.EXPIRED), now)
            return None
        request.status = RequestStatus.RUNNING
        request.started_at = request.started_at or now
        request.deliveries += 1
        tenant = session.get(Tenant, batch.tenant_id)
        return RunStart(
            request_id=request.id,
            batch_id=batch.id,
            model=request.model,
            body=request.body,
            priority=request.priority,
            expires_at=batch.expires_at,
            tenant=tenant.name if tenant else batch.tenant_id,
        )

    return db.transact(unit)


def begin_attempt(
    db: Database,
    request_id: str,
    *,
    deployment: str,
    provider: str,
    model: str,
    estimated_input_tokens: int,
    worker: str,
) -> int | None:
    """Write the attempt row before the call; its number, or None if the request ended meanwhile."""

    def unit(session: Session) -> int | None:
        request = _lock_request(session, request_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return None
        request.attempt_count += 1
        session.add(
            Attempt(
                request_id=request_id,
                attempt_no=request.attempt_count,
                deployment=deployment,
                provider=provider,
                model=model,
                started_at=utcnow(),
                outcome=AttemptOutcome.IN_FLIGHT,
                estimated_input_tokens=estimated_input_tokens,
                worker=worker,
                input_tokens=0,
                output_tokens=0,
                cost_estimated=False,
            )
        )
        return request.attempt_count

    return db.transact(unit)


def finish_attempt(
    db: Database, request_id: str, attempt_no: int, result: AttemptResult, end: RequestEnd | None = None
) -> None:
    """Record a call's outcome and cost, and (if given) the request's end: one transaction."""

    def unit(session: Session) -> None:
        now = utcnow()
        request = _lock_request(session, request_id)
        assert request is not None
        attempt = session.scalars(
            select(Attempt)
            .where(Attempt.request_id == request_id, Attempt.attempt_no == attempt_no)
            .with_for_update()
        ).one()
        batch = _lock_batch(session, request.batch_id)
        if attempt.outcome in (AttemptOutcome.IN_FLIGHT, AttemptOutcome.LOST):
            if attempt.outcome == AttemptOutcome.LOST:
                # Declared lost too early; the real figures replace the estimate.
                _add_usage(
                    request, batch, attempt.input_tokens, attempt.output_tokens, attempt.cost_usd, sign=-1
                )
            usage = result.usage or Usage(0, 0)
            attempt.outcome = result.outcome
            attempt.ended_at = now
            attempt.http_status = result.http_status
            attempt.latency_ms = result.latency_ms
            attempt.input_tokens = usage.input_tokens
            attempt.output_tokens = usage.output_tokens
            attempt.error = result.error
            attempt.provider_request_id = result.provider_request_id
            attempt.cost_estimated = False
            # A failed call before any tokens were used costs nothing; with usage, its price.
            attempt.cost_usd = result.cost_usd if result.usage is not None else Decimal(0)
            _add_usage(request, batch, usage.input_tokens, usage.output_tokens, attempt.cost_usd)
        if end is not None:
            end_request(session, request, batch, end, now)

    db.transact(unit)


def end_run(db: Database, request_id: str, end: RequestEnd) -> None:
    """End a request without a call (no route, chain exhausted, deadline passed)."""

    def unit(session: Session) -> None:
        request = _lock_request(session, request_id)
        if request is None:
            return
        batch = _lock_batch(session, request.batch_id)
        end_request(session, request, batch, end, utcnow())

    db.transact(unit)


def defer_run(db: Database, request_id: str) -> None:
    """Hand a running request back to the queue (it waits in the delay queue meanwhile)."""

    def unit(session: Session) -> None:
        request = _lock_request(session, request_id)
        if request is not None and request.status == RequestStatus.RUNNING:
            request.status = RequestStatus.QUEUED

    db.transact(unit)


def return_to_outbox(db: Database, request_id: str) -> None:
    """A request that could not run for want of Redis: queued and unpublished again, so that the
    publisher sweep sends it once the broker is back."""

    def unit(session: Session) -> None:
        request = _lock_request(session, request_id)
        if request is not None and request.status in (RequestStatus.QUEUED, RequestStatus.RUNNING):
            request.status = RequestStatus.QUEUED
            request.published_at = None

    db.transact(unit)
