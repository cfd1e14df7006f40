"""How a batch moves to its end, shared by the workers (a request ends) and the API (cancel, expiry).

Lock order everywhere: request rows, then attempt rows, then the batch row. The batch row is the
hot one (every request of a batch counts on it), so a transaction touches it once and last: one
atomic ``UPDATE ... SET n = n + delta`` of its counters, no read-modify-write and no earlier
``SELECT ... FOR UPDATE``. Its lock is then held only from that statement to the commit, and two
workers ending requests of one batch never wait on each other for longer than that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from db.models import Batch, LlmRequest
from db.states import BatchStatus, RequestStatus
from db.webhooks import enqueue_batch_event

OPEN_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
_ENDED_COLUMNS = ("succeeded_count", "failed_count", "cancelled_count", "expired_count")


@dataclass
class BatchDelta:
    """What one transaction adds to its batch's counters; ``apply_delta`` writes it, last."""

    succeeded_count: int = 0
    failed_count: int = 0
    cancelled_count: int = 0
    expired_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_attempts: int = 0

    def ended(self, status: RequestStatus, n: int = 1) -> None:
        name = f"{status.value}_count"
        setattr(self, name, getattr(self, name) + n)

    def usage(self, tokens_in: int, tokens_out: int, cost: Decimal | None, sign: int = 1) -> None:
        """One call's tokens and cost (``sign=-1`` takes back an estimate the real figures replace)."""
        self.input_tokens += sign * tokens_in
        self.output_tokens += sign * tokens_out
        if cost is None:
            self.unpriced_attempts += sign
        else:
            self.cost_usd += sign * cost

    def changes(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


_batches = cast(Table, Batch.__table__)
_ADD_DELTA = (
    update(_batches)
    .where(_batches.c.id == bindparam("b_batch_id"))
    .values(
        {
            f.name: _batches.c[f.name] + bindparam(f"d_{f.name}", type_=_batches.c[f.name].type)
            for f in fields(BatchDelta)
        }
    )
    .returning(_batches.c.total_count, _batches.c.status, *(_batches.c[c] for c in _ENDED_COLUMNS))
)


def apply_delta(
    session: Session, batch_id: str, delta: BatchDelta, now: datetime, also: Mapping[str, Any] | None = None
) -> None:
    """Add ``delta`` to the batch in one statement (setting ``also`` in the same statement: a
    cancel marks the batch here, not before, to keep the lock order); end the batch if that was
    its last request."""
    changes = delta.changes()
    if not changes and not also:
        return
    if also:
        counts = session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values({name: getattr(Batch, name) + value for name, value in changes.items()} | dict(also))
            .returning(Batch.total_count, Batch.status, *(getattr(Batch, c) for c in _ENDED_COLUMNS))
            .execution_options(synchronize_session=False)
        ).one()
    else:
        # Every request's end takes this path: one statement built once, adding every counter.
        params = {f"d_{f.name}": getattr(delta, f.name) for f in fields(delta)}
        counts = session.execute(_ADD_DELTA, params | {"b_batch_id": batch_id}).one()
    total, status, *ended = counts
    counted_an_end = any(name in changes for name in _ENDED_COLUMNS) or bool(also)
    if counted_an_end and sum(ended) >= total and status in OPEN_BATCH_STATUSES:
        # The row is ours until the commit (the UPDATE locked it); read it fresh to end it.
        batch = session.get(Batch, batch_id, populate_existing=True)
        assert batch is not None
        finish_if_done(session, batch, now)


def finish_if_done(session: Session, batch: Batch, now: datetime) -> bool:
    """End the batch once every request has ended, and queue its webhook event."""
    ended = batch.succeeded_count + batch.failed_count + batch.cancelled_count + batch.expired_count
    if ended < batch.total_count or batch.status not in OPEN_BATCH_STATUSES:
        return False
    if batch.cancelled_at is not None:
        batch.status = BatchStatus.CANCELLED
    elif batch.expired_count:
        batch.status = BatchStatus.EXPIRED
    else:
        batch.status = BatchStatus.COMPLETED
    batch.ended_at = now
    enqueue_batch_event(session, batch, now)
    return True


def end_queued_requests(
    session: Session,
    batch_id: str,
    status: RequestStatus,
    now: datetime,
    error: dict[str, Any],
    also: Mapping[str, Any] | None = None,
) -> int:
    """End every request of the batch still waiting its turn (cancel, expiry); running ones finish
    by themselves. Locks the queued request rows first (in id order, as every transaction that
    takes several does), then counts them on the batch. Returns how many were ended."""
    queued = session.execute(
        select(LlmRequest.id, LlmRequest.error)
        .where(LlmRequest.batch_id == batch_id, LlmRequest.status == RequestStatus.QUEUED)
        .order_by(LlmRequest.id)
        .with_for_update()
    ).all()
    plain = [row.id for row in queued if not deployment_errors(row.error)]
    for start in range(0, len(plain), 1000):
        session.execute(
            update(LlmRequest)
            .where(LlmRequest.id.in_(plain[start : start + 1000]))
            .values(status=status.value, ended_at=now, error=error, lease=None)
            .execution_options(synchronize_session=False)
        )
    # A request that waited for provider trouble keeps each deployment's last error in its end.
    for row in queued:
        if deployment_errors(row.error):
            session.execute(
                update(LlmRequest)
                .where(LlmRequest.id == row.id)
                .values(
                    status=status.value,
                    ended_at=now,
                    error={**error, "deployments": deployment_errors(row.error)},
                    lease=None,
                )
                .execution_options(synchronize_session=False)
            )
    delta = BatchDelta()
    delta.ended(status, len(queued))
    apply_delta(session, batch_id, delta, now, also)
    return len(queued)


def deployment_errors(error: dict[str, Any] | None) -> list[Any]:
    """Each deployment's last error as a request's error holds them (while it waits, and after)."""
    deployments = (error or {}).get("deployments")
    return deployments if isinstance(deployments, list) else []
