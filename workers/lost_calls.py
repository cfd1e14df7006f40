"""What a run that died leaves in the ledger, and how it is settled: its calls in flight are
costed as lost (estimated, marked so), and its request goes back to the outbox or to the run that
takes it over. Split from ``workers.ledger``, which uses it when a run begins."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.attribution import stored_tags
from db.batch_state import BatchDelta, apply_delta
from db.engine import Database
from db.models import Attempt, Batch, LlmRequest, Tenant
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import observe
from workers.observe import Spent
from workers.providers.base import Usage

log = logging.getLogger(__name__)

# A call whose run died: (deployment name, estimated input tokens, request body) ->
# (estimated output tokens, estimated cost in USD or None when no price is known).
LostCallEstimator = Callable[[str, int, dict[str, Any]], tuple[int, Decimal | None]]


@dataclass(frozen=True)
class Claim:
    """How to judge what an earlier, dead run of a request left behind."""

    estimate_lost: LostCallEstimator
    max_deliveries: int  # runs that never ended cleanly before the request is called poison


def lock_request(session: Session, request_id: str) -> LlmRequest | None:
    return session.get(LlmRequest, request_id, with_for_update=True)


def billed_attempts(session: Session, request_id: str) -> int:
    """Calls of the request the provider may have charged for: those the policy marked so when
    they ended, and those lost with their run (nobody knows how far they got)."""
    rows = session.execute(select(Attempt.outcome, Attempt.error).where(Attempt.request_id == request_id))
    return sum(
        1 for outcome, error in rows if outcome == AttemptOutcome.LOST or (error or {}).get("may_have_billed")
    )


def mark_lost_attempts(
    session: Session, request: LlmRequest, delta: BatchDelta, claim: Claim, now: datetime
) -> list[Spent]:
    """Attempts left in flight by a run whose lease is gone get their cost row, marked estimated.
    Called only once that run is known dead, so every in-flight attempt of the request is its.
    Returns what they cost, for the metrics once the transaction has committed."""
    in_flight = session.scalars(
        select(Attempt)
        .where(Attempt.request_id == request.id, Attempt.outcome == AttemptOutcome.IN_FLIGHT)
        .with_for_update()
    ).all()
    for attempt in in_flight:
        output_tokens, cost = claim.estimate_lost(
            attempt.deployment, attempt.estimated_input_tokens, request.body
        )
        attempt.outcome = AttemptOutcome.LOST
        attempt.ended_at = now
        attempt.cost_usd = cost
        attempt.cost_estimated = True
        attempt.input_tokens = attempt.estimated_input_tokens
        attempt.output_tokens = output_tokens
        attempt.error = {"kind": "lost", "message": "the run making this call stopped before it ended"}
        _add_usage(request, delta, attempt.input_tokens, attempt.output_tokens, cost)
        log.warning("request %s attempt %d lost with its run; cost estimated", request.id, attempt.attempt_no)
    if not in_flight:
        return []
    batch = session.get(Batch, request.batch_id)
    tenant = session.get(Tenant, batch.tenant_id) if batch else None
    tags = stored_tags(request.tags, batch.metadata_ if batch else None)
    return [
        Spent(
            tenant=tenant.name if tenant else "",
            route=request.model,
            deployment=a.deployment,
            tags=tags,
            usage=Usage(a.input_tokens, a.output_tokens),
            cost_usd=a.cost_usd,
        )
        for a in in_flight
    ]


def _add_usage(
    request: LlmRequest,
    delta: BatchDelta,
    tokens_in: int,
    tokens_out: int,
    cost: Decimal | None,
    sign: int = 1,
) -> None:
    """Count one call's tokens and cost on its request and batch (``sign=-1`` takes them back)."""
    request.input_tokens += sign * tokens_in
    request.output_tokens += sign * tokens_out
    if cost is not None:
        request.cost_usd += sign * cost
        request.overhead_cost_usd += sign * cost  # a lost call never answered
    else:
        request.unpriced_attempts += sign
    delta.usage(tokens_in, tokens_out, cost, sign)


def requeue_orphan(db: Database, request_id: str, dead_lease: str | None, claim: Claim) -> bool:
    """The recovery sweep: a RUNNING request whose run's lease expired goes back to the outbox,
    its in-flight calls costed as lost. Guarded by the dead run's token, so a sweep acting on a
    stale reading never touches a run that has taken the request since."""

    def unit(session: Session) -> list[Spent] | None:
        request = lock_request(session, request_id)
        if request is None or request.status != RequestStatus.RUNNING or request.lease != dead_lease:
            return None
        now = utcnow()
        delta = BatchDelta()
        lost = mark_lost_attempts(session, request, delta, claim, now)
        request.status = RequestStatus.QUEUED
        request.lease = None
        request.published_at = None
        apply_delta(session, request.batch_id, delta, now, shard_key=request.id)
        return lost

    lost = db.transact(unit)
    if lost is None:
        return False
    observe.lease_recovered(lost)
    return True
