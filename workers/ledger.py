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

from db.batch_state import count_request_end
from db.engine import Database
from db.models import Attempt, Batch, LlmRequest, Tenant
from db.states import TERMINAL_REQUEST_STATUSES, AttemptOutcome, RequestStatus
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
    created_at: datetime


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


def _lock_request(session: Session, request_id: str) -> LlmRequest | None:
    return session.get(LlmRequest, request_id, with_for_update=True)


def _lock_batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id, with_for_update=True)
    assert batch is not None, f"request of missing batch {batch_id}"
    return batch


def end_request(session: Session, request: LlmRequest, batch: Batch, end: RequestEnd, now: datetime) -> None:
    """Move a request to its final state and count it on its batch, exactly once."""
    if request.status in TERMINAL_REQUEST_STATUSES:
        return
    request.status = end.status
    request.response = end.response
    request.error = end.error
    request.deployment = end.deployment or request.deployment
    request.ended_at = now
    request.owner = None
    count_request_end(session, batch, end.status, now)


def _mark_lost_attempts(
    session: Session, request: LlmRequest, batch: Batch, claim: Claim, now: datetime
) -> None:
    """Attempts left in flight by a dead worker get their cost row, marked estimated.

    Dead: its worker's heartbeat has stopped, or it started longer ago than any call can last.
    """
    stale_before = now - timedelta(seconds=claim.stale_attempt_s)
    in_flight = session.scalars(
        select(Attempt)
        .where(Attempt.request_id == request.id, Attempt.outcome == AttemptOutcome.IN_FLIGHT)
        .with_for_update()
    ).all()
    output_tokens = claim.estimated_output_tokens(request.body)
    for attempt in in_flight:
        if attempt.started_at >= stale_before and attempt.worker and claim.owner_alive(attempt.worker):
            continue
        cost = claim.estimate_lost(attempt.deployment, attempt.estimated_input_tokens, output_tokens)
        attempt.outcome = AttemptOutcome.LOST
        attempt.ended_at = now
        attempt.cost_usd = cost
        attempt.cost_estimated = True
        attempt.input_tokens = attempt.estimated_input_tokens
        attempt.output_tokens = output_tokens
        attempt.error = {"kind": "lost", "message": "the worker making this call stopped before it ended"}
        _add_usage(request, batch, attempt.input_tokens, attempt.output_tokens, cost)
        log.warning(
            "request %s attempt %d lost with its worker; cost estimated", request.id, attempt.attempt_no
        )


def _add_usage(
    request: LlmRequest, batch: Batch, tokens_in: int, tokens_out: int, cost: Decimal | None, sign: int = 1
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


@dataclass(frozen=True)
class Claim:
    """Who claims a delivered request, and how to judge what an earlier delivery left behind."""

    worker: str  # host:pid of this worker process
    owner_alive: Callable[[str], bool]  # is that worker's heartbeat still beating?
    stale_attempt_s: float  # an attempt older than this cannot still be in flight
    estimate_lost: LostCostEstimator
    estimated_output_tokens: Callable[[dict[str, Any]], int]
    max_deliveries: int  # runs that never ended cleanly before the request is called poison


def begin_run(db: Database, request_id: str, claim: Claim) -> RunStart | None:
    """Claim a delivered request. None when there is nothing to do (already ended, cancelled,
    or running under a live owner: a duplicate delivery)."""

    def unit(session: Session) -> RunStart | None:
        now = utcnow()
        request = _lock_request(session, request_id)
        if request is None:
            log.warning("request %s is not in the ledger; dropping its message", request_id)
            return None
        if request.status in TERMINAL_REQUEST_STATUSES:
            return None  # a redelivery of finished work: its result is already written once
        owner = request.owner
        if (
            request.status == RequestStatus.RUNNING
            and owner
            and owner != claim.worker
            and claim.owner_alive(owner)
        ):
            log.info("request %s is running on %s; this delivery is a duplicate", request_id, owner)
            return None
        batch = _lock_batch(session, request.batch_id)
        _mark_lost_attempts(session, request, batch, claim, now)
        if request.deliveries >= claim.max_deliveries:
            message = f"its worker died {request.deliveries} times running it: not trying again"
            end_request(
                session,
                request,
                batch,
                RequestEnd(RequestStatus.FAILED, error={"kind": "poison", "message": message}),
                now,
            )
            return None
        if batch.cancelled_at is not None:
            end_request(session, request, batch, RequestEnd(RequestStatus.CANCELLED), now)
            return None
        if now >= batch.expires_at:
            end_request(session, request, batch, RequestEnd(RequestStatus.EXPIRED), now)
            return None
        request.status = RequestStatus.RUNNING
        request.started_at = request.started_at or now
        request.owner = claim.worker
        # Counts runs that have not ended cleanly; a deferral or a clean hand-back takes it back.
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
            created_at=request.created_at,
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
    """Write the attempt row before the call; its number, or None if the request ended meanwhile
    (a duplicate delivery finished it, or its batch was cancelled: no new call then)."""

    def unit(session: Session) -> int | None:
        request = _lock_request(session, request_id)
        if request is None or request.status != RequestStatus.RUNNING:
            return None
        batch = _lock_batch(session, request.batch_id)
        if batch.cancelled_at is not None:
            end_request(
                session,
                request,
                batch,
                RequestEnd(
                    RequestStatus.CANCELLED,
                    error={"kind": "cancelled", "message": "the batch was cancelled before this attempt"},
                ),
                utcnow(),
            )
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
            request.owner = None
            request.deliveries -= 1  # a clean hand-back, not a crash

    db.transact(unit)


def return_to_outbox(db: Database, request_ids: list[str], *, clean: bool, owner: str | None = None) -> int:
    """Queued and unpublished again, so that the publisher sweep sends them: after a Redis outage
    mid-run (``clean``), or when their owner died (the recovery sweep; only while still RUNNING
    under that ``owner``). Returns how many were returned."""

    def unit(session: Session) -> int:
        returned = 0
        for request_id in request_ids:
            request = _lock_request(session, request_id)
            if request is None or request.status not in (RequestStatus.QUEUED, RequestStatus.RUNNING):
                continue
            if owner is not None and (request.status != RequestStatus.RUNNING or request.owner != owner):
                continue
            if clean and request.status == RequestStatus.RUNNING:
                request.deliveries -= 1
            request.status = RequestStatus.QUEUED
            request.owner = None
            request.published_at = None
            returned += 1
        return returned

    return db.transact(unit)


def running_owners(db: Database) -> dict[str, list[str]]:
    """Requests now RUNNING, by owner."""
    with db.session() as session:
        rows = session.execute(
            select(LlmRequest.id, LlmRequest.owner).where(LlmRequest.status == RequestStatus.RUNNING)
        ).all()
    owners: dict[str, list[str]] = {}
    for request_id, owner in rows:
        owners.setdefault(owner or "", []).append(request_id)
    return owners
