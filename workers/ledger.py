"""The worker's writes to the ledger. Each function is one idempotent transaction.

Every change of a running request is guarded by its lease token: a run that was declared dead
(its lease expired and another run took the request) can still record the calls it paid for, but
it can no longer end, defer or hand back a request that is not its own.

What a run that died left behind (its calls in flight, costed as lost) is settled in
``workers.lost_calls``, by the run that takes the request over or by the orphan sweep.

Lock order everywhere: request, then attempts, then batch (the batch row last and briefly: see
``db.batch_state``), so that workers, cancels and sweeps never deadlock on PostgreSQL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.attribution import stored_tags
from db.batch_state import BatchDelta, apply_delta, deployment_errors
from db.engine import Database
from db.models import Batch, LlmRequest, Tenant
from db.states import TERMINAL_REQUEST_STATUSES, AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger_statements as sql
from workers import observe
from workers.ledger_records import AttemptResult as AttemptResult
from workers.ledger_records import RequestEnd as RequestEnd
from workers.ledger_records import RunStart as RunStart
from workers.lost_calls import Claim, billed_attempts, lock_request, mark_lost_attempts
from workers.providers.base import Usage

log = logging.getLogger(__name__)


def _owned(request: LlmRequest | None, lease: str) -> bool:
    return request is not None and request.status == RequestStatus.RUNNING and request.lease == lease


def end_request(request: LlmRequest, delta: BatchDelta, end: RequestEnd, now: datetime) -> None:
    """Move a request to its final state and count it for its batch, exactly once."""
    if request.status in TERMINAL_REQUEST_STATUSES:
        return
    request.status = end.status
    request.response = end.response
    request.error = end.error
    request.deployment = end.deployment or request.deployment
    request.ended_at = now
    request.lease = None
    delta.ended(end.status)


def begin_run(db: Database, request_id: str, lease: str, claim: Claim) -> RunStart | None:
    """Make the run holding ``lease`` the request's owner. The caller already holds the lease in
    Redis, so a run that owned the request before is dead: its in-flight calls are costed as lost.
    None when there is nothing to do (already ended, cancelled, expired, or poison)."""

    def unit(session: Session) -> RunStart | _Claimed | None:
        # One statement reads the request (locked), its batch and its tenant; the usual run (a
        # first delivery of a live request) is one more statement. Anything else takes the
        # general path below.
        now = utcnow()
        row = session.execute(sql.RUN_START, {"request_id": request_id}).one_or_none()
        if row is None:
            log.warning("request %s is not in the ledger; dropping its message", request_id)
            return None
        if row.status in TERMINAL_REQUEST_STATUSES:
            return None  # a redelivery of finished work: its result is already written once
        unusual = (
            row.attempt_count > 0
            or row.deliveries >= claim.max_deliveries
            or row.cancelled_at is not None
            or now >= row.expires_at
        )
        if unusual:
            return _claim_request(session, request_id, lease, claim, now)
        session.execute(sql.START_RUN, {"b_request_id": request_id, "v_lease": lease, "now": now})
        tenant = row.tenant_name or row.tenant_id
        tags, paused = stored_tags(row.tags, row.batch_metadata), row.tenant_paused_at is not None
        return _run_start(row, row.expires_at, tenant, billed=0, tags=tags, paused=paused)

    started = db.transact(unit)
    if not isinstance(started, _Claimed):
        return started
    observe.lost_calls(started.lost)
    if started.stopped is not None:
        observe.request_ended(*started.stopped)
    return started.run


@dataclass(frozen=True)
class _Claimed:
    """What begin_run's general path did: the run, if any; the calls of a dead run it costed as
    lost; and (route, priority, status) of a request it ended instead."""

    run: RunStart | None
    lost: list[observe.Spent]
    stopped: tuple[str, str, str] | None = None


def _claim_request(session: Session, request_id: str, lease: str, claim: Claim, now: datetime) -> _Claimed:
    """begin_run's general path: earlier attempts to cost or count, or a request to end now."""
    request = lock_request(session, request_id)
    assert request is not None
    batch = session.get(Batch, request.batch_id)
    assert batch is not None, f"request {request_id} of a missing batch"
    delta = BatchDelta()
    lost = mark_lost_attempts(session, request, delta, claim, now)
    stop: RequestEnd | None = None
    if request.deliveries >= claim.max_deliveries:
        message = f"its run died {request.deliveries} times: not trying again"
        stop = RequestEnd(RequestStatus.FAILED, error={"kind": "poison", "message": message})
    elif batch.cancelled_at is not None:
        stop = RequestEnd(RequestStatus.CANCELLED)
    elif now >= batch.expires_at:
        message = "the batch's completion window passed before this request could run"
        error = {"kind": "expired", "message": message, "deployments": deployment_errors(request.error)}
        stop = RequestEnd(RequestStatus.EXPIRED, error=error)
    if stop is not None:
        end_request(request, delta, stop, now)
    else:
        request.status = RequestStatus.RUNNING
        request.started_at = request.started_at or now
        request.lease = lease
        # Counts runs that have not ended cleanly; a deferral or a clean hand-back takes it back.
        request.deliveries += 1
    apply_delta(session, batch.id, delta, now, shard_key=request.id)
    if stop is not None:
        return _Claimed(None, lost, (request.model, request.priority, stop.status.value))
    tenant = session.get(Tenant, batch.tenant_id)
    name = tenant.name if tenant else batch.tenant_id
    billed = billed_attempts(session, request.id)
    tags, paused = stored_tags(request.tags, batch.metadata_), bool(tenant and tenant.paused_at)
    run = _run_start(request, batch.expires_at, name, billed=billed, tags=tags, paused=paused)
    return _Claimed(run, lost)


def _run_start(
    request: Any, expires_at: datetime, tenant: str, *, billed: int, tags: dict[str, str], paused: bool
) -> RunStart:
    """A run's start from the request's columns (an ORM object or a row: the same names)."""
    return RunStart(
        request_id=request.id,
        batch_id=request.batch_id,
        model=request.model,
        body=request.body,
        priority=request.priority,
        expires_at=expires_at,
        tenant=tenant,
        created_at=request.created_at,
        billed_attempts=billed,
        park_rounds=request.park_rounds,
        last_errors=tuple(deployment_errors(request.error)),
        tags=tags,
        tenant_paused=paused,
    )


def begin_attempt(
    db: Database,
    request_id: str,
    lease: str,
    *,
    deployment: str,
    provider: str,
    model: str,
    estimated_input_tokens: int,
    worker: str,
) -> int | None:
    """Write the attempt row before the call; its number, or None when no call may be made: the
    run lost the request (its lease was taken over), or the batch was cancelled meanwhile."""

    def unit(session: Session) -> int | None:
        # Statements built once (module level), not ORM objects: this runs before every call,
        # and building statements and loading the request only to count it cost more than the
        # rest of the transaction. The UPDATE takes the request's row lock first, as every
        # transaction here does.
        owned = session.execute(sql.COUNT_ATTEMPT, {"request_id": request_id, "b_lease": lease}).one_or_none()
        if owned is None:
            return None
        attempt_no, batch_id, cancelled_at = owned
        if cancelled_at is not None:
            request = lock_request(session, request_id)
            assert request is not None
            request.attempt_count -= 1  # no call is made
            delta = BatchDelta()
            message = "the batch was cancelled before this attempt"
            end_request(
                request,
                delta,
                RequestEnd(RequestStatus.CANCELLED, error={"kind": "cancelled", "message": message}),
                utcnow(),
            )
            apply_delta(session, batch_id, delta, utcnow(), shard_key=request_id)
            return None
        session.execute(
            sql.NEW_ATTEMPT,
            {
                "request_id": request_id,
                "attempt_no": attempt_no,
                "deployment": deployment,
                "provider": provider,
                "model": model,
                "started_at": utcnow(),
                "outcome": AttemptOutcome.IN_FLIGHT.value,
                "estimated_input_tokens": estimated_input_tokens,
                "worker": worker,
                "lease": lease,
                "input_tokens": 0,
                "output_tokens": 0,
                "cost_estimated": False,
            },
        )
        return int(attempt_no)

    return db.transact(unit)


def finish_attempt(
    db: Database,
    request_id: str,
    lease: str,
    attempt_no: int,
    result: AttemptResult,
    end: RequestEnd | None = None,
) -> bool:
    """Record a call's outcome and cost, and (if given) the request's end: one transaction.

    The call was made, so its row is always written, even by a run that has lost the request.
    Returns whether the request is still this run's (False: stop here, another run owns it).
    """

    def unit(session: Session) -> bool:
        # Prebuilt statements, as in begin_attempt: this runs after every call.
        now = utcnow()
        request = session.execute(sql.LOCK_REQUEST_STATE, {"request_id": request_id}).one()
        keys = {"request_id": request_id, "attempt_no": attempt_no}
        attempt = session.execute(sql.LOCK_ATTEMPT, keys).one()
        delta = BatchDelta()
        added = BatchDelta()  # what the request's own counters get: the delta's usage part
        overhead = Decimal(0)  # of added.cost_usd, what calls that did not answer cost
        cache_read = cache_write = 0  # a lost call's estimate had none: nothing to take back
        if attempt.lease == lease and attempt.outcome in (AttemptOutcome.IN_FLIGHT, AttemptOutcome.LOST):
            if attempt.outcome == AttemptOutcome.LOST:
                # Declared lost too early; the real figures replace the estimate.
                for counts in (delta, added):
                    counts.usage(attempt.input_tokens, attempt.output_tokens, attempt.cost_usd, -1)
                overhead -= attempt.cost_usd or Decimal(0)
            usage = result.usage or Usage(0, 0)
            cache_read, cache_write = usage.cache_read_tokens, usage.cache_write_tokens
            # A failed call before any tokens were used costs nothing; with usage, its price.
            cost = result.cost_usd if result.usage is not None else Decimal(0)
            session.execute(
                sql.RECORD_ATTEMPT,
                {
                    "b_request_id": request_id,
                    "b_attempt_no": attempt_no,
                    "outcome": result.outcome.value,
                    "ended_at": now,
                    "http_status": result.http_status,
                    "latency_ms": result.latency_ms,
                    "first_chunk_ms": result.first_chunk_ms,
                    "generation_ms": result.generation_ms,
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                    "cache_read_tokens": cache_read,
                    "cache_write_tokens": cache_write,
                    "error": result.error,
                    "provider_request_id": result.provider_request_id,
                    "cost_estimated": False,
                    "cost_usd": cost,
                },
            )
            for counts in (delta, added):
                counts.usage(usage.input_tokens, usage.output_tokens, cost)
            if result.outcome != AttemptOutcome.SUCCESS:
                overhead += cost or Decimal(0)
        usage_params = {
            "b_request_id": request_id,
            "d_in": added.input_tokens,
            "d_out": added.output_tokens,
            "d_cache_read": cache_read,
            "d_cache_write": cache_write,
            "d_cost": added.cost_usd,
            "d_overhead": overhead,
            "d_unpriced": added.unpriced_attempts,
        }
        owned: bool = request.status == RequestStatus.RUNNING and request.lease == lease
        if owned and end is not None:
            end_params = {
                "status": end.status.value,
                "response": end.response,
                "error": end.error,
                "deployment": end.deployment,
                "ended_at": now,
            }
            session.execute(sql.END_REQUEST, usage_params | end_params)
            if end.notes:  # e.g. what an OpenAI deployment that answered was not sent
                noted = session.execute(sql.REQUEST_NOTES, {"request_id": request_id}).scalar()
                notes = {**(noted or {}), **end.notes}
                session.execute(sql.SET_NOTES, {"b_request_id": request_id, "v_notes": notes})
            delta.ended(end.status)
        elif added.changes() or overhead:
            session.execute(sql.ADD_USAGE, usage_params)
        apply_delta(session, request.batch_id, delta, now, shard_key=request_id)
        return owned

    return db.transact(unit)


def note_request(db: Database, request_id: str, lease: str, notes: dict[str, Any]) -> None:
    """Keep what the run did to the request on its way, for its result line (its run only)."""

    def unit(session: Session) -> None:
        request = lock_request(session, request_id)
        if request is not None and _owned(request, lease):
            request.notes = {**(request.notes or {}), **notes}

    db.transact(unit)


def end_run(db: Database, request_id: str, lease: str, end: RequestEnd) -> None:
    """End a request without a call (no route, chain exhausted, deadline passed)."""

    def unit(session: Session) -> None:
        request = lock_request(session, request_id)
        if request is None or not _owned(request, lease):
            return
        delta = BatchDelta()
        now = utcnow()
        end_request(request, delta, end, now)
        apply_delta(session, request.batch_id, delta, now, shard_key=request_id)

    db.transact(unit)


def defer_run(
    db: Database, request_id: str, lease: str, *, waiting: dict[str, Any] | None = None, trouble: bool = False
) -> bool:
    """Hand a running request back to the queue, to wait in the delay queue (the caller parks it
    there once this returned True). ``waiting``: why, with each deployment's last error, kept as
    the request's error until it ends; ``trouble``: it waits for provider trouble to pass (its
    next wait will be longer)."""

    def unit(session: Session) -> bool:
        request = lock_request(session, request_id)
        if request is None or not _owned(request, lease):
            return False
        request.status = RequestStatus.QUEUED
        request.lease = None
        request.deliveries -= 1  # a clean hand-back, not a crash
        if waiting is not None:
            request.error = waiting
        if trouble:
            request.park_rounds += 1
        return True

    return db.transact(unit)


def hand_back(db: Database, request_id: str, lease: str | None, *, clean: bool) -> bool:
    """Queued and unpublished again, so that the publisher sweep sends it: the run could not go on
    (Redis unreachable: ``clean``, not counted against the poison cap; or a failure of its own).
    With ``lease`` None (no run began) only a QUEUED request is touched."""

    def unit(session: Session) -> bool:
        request = lock_request(session, request_id)
        if request is None:
            return False
        if lease is None and request.status != RequestStatus.QUEUED:
            return False
        if lease is not None and not _owned(request, lease):
            return False
        if clean and request.status == RequestStatus.RUNNING:
            request.deliveries -= 1
        request.status = RequestStatus.QUEUED
        request.lease = None
        request.published_at = None
        return True

    return db.transact(unit)


def queued_priority(db: Database, request_id: str) -> str | None:
    """The request's priority if it is QUEUED (waiting for a delivery), else None."""
    with db.session() as session:
        row = session.execute(
            select(LlmRequest.status, LlmRequest.priority).where(LlmRequest.id == request_id)
        ).one_or_none()
    return row.priority if row is not None and row.status == RequestStatus.QUEUED else None
