"""The ledger write of a request answered without a call of its own: an attempt row that cost
nothing (``cache_hit`` or ``coalesced``, with what the call it reuses cost as its saving) and the
request's end, in one transaction guarded by the run's lease, as every write of a run is."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.batch_state import BatchDelta, apply_delta
from db.engine import Database
from db.models import Attempt, Batch
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers.answer_cache import CachedAnswer
from workers.ledger import end_request
from workers.ledger_records import RequestEnd
from workers.lost_calls import lock_request


@dataclass(frozen=True)
class Served:
    answer: CachedAnswer
    outcome: AttemptOutcome  # CACHE_HIT or COALESCED
    served_from: str  # cache, semantic_cache, coalesced
    notes: dict[str, Any]  # for its result line: {"cached": true} or {"coalesced": true}, ...


def serve_answer(
    db: Database, request_id: str, lease: str, served: Served, worker: str
) -> RequestStatus | None:
    """End the request with ``served``'s answer: SUCCEEDED, CANCELLED when its batch was cancelled
    meanwhile, or None when the run no longer owns it (nothing written)."""

    def unit(session: Session) -> RequestStatus | None:
        request = lock_request(session, request_id)
        if request is None or request.status != RequestStatus.RUNNING or request.lease != lease:
            return None
        now = utcnow()
        delta = BatchDelta()
        cancelled = session.scalar(select(Batch.cancelled_at).where(Batch.id == request.batch_id))
        if cancelled is not None:
            message = "the batch was cancelled before its answer was served"
            end = RequestEnd(RequestStatus.CANCELLED, error={"kind": "cancelled", "message": message})
            end_request(request, delta, end, now)
            apply_delta(session, request.batch_id, delta, now, shard_key=request_id)
            return RequestStatus.CANCELLED
        answer = served.answer
        request.attempt_count += 1
        session.add(
            Attempt(
                request_id=request_id,
                attempt_no=request.attempt_count,
                deployment=answer.deployment,
                provider=answer.provider,
                model=answer.model,
                started_at=now,
                ended_at=now,
                outcome=served.outcome.value,
                latency_ms=0,
                input_tokens=0,
                output_tokens=0,
                cost_usd=Decimal(0),
                cost_estimated=False,
                saved_cost_usd=answer.saved_usd,
                worker=worker,
                lease=lease,
            )
        )
        request.served_from = served.served_from
        request.saved_cost_usd = (request.saved_cost_usd or Decimal(0)) + answer.saved_usd
        request.notes = {**(request.notes or {}), **served.notes}
        end = RequestEnd(RequestStatus.SUCCEEDED, response=answer.response, deployment=answer.deployment)
        end_request(request, delta, end, now)
        apply_delta(session, request.batch_id, delta, now, shard_key=request_id)
        return RequestStatus.SUCCEEDED

    return db.transact(unit)
