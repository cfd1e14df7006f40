"""How a batch moves to its end, shared by the workers (a request ends) and the API (cancel, expiry).

A batch's counters are its own row's plus those of its shares in ``batch_counters`` (``counted``
reads them together). A request's end adds to one share, chosen by the request
(``COUNTER_SHARDS`` of them): updates of one row go one at a time, each waiting for the previous
commit's WAL flush, and a single row capped a batch at about 2,200 ends a second (docs/scale.md).
Cancel and expiry, which end many requests in one statement, add to the batch's own row.

The batch ends when the ends counted reach its total. A transaction sees its own end and those
already committed, not those of transactions committing beside it: so the one that sees the
last end ends the batch (locking its row, last), a transaction that counted one of the last
``LATE_ENDS`` looks again after its commit, and the expiry sweep ends any batch both missed
(``end_counted_batches``).

Lock order everywhere: request rows, then attempt rows, then counters, then the batch row.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from db.models import Batch, BatchCounter, LlmRequest
from db.states import BatchStatus, RequestStatus
from db.types import utcnow
from db.webhooks import enqueue_batch_event

OPEN_BATCH_STATUSES = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING)
_ENDED_COLUMNS = ("succeeded_count", "failed_count", "cancelled_count", "expired_count")
COUNTER_SHARDS = 16
# A transaction that counted an end with at most this many left looks again after its commit:
# ends committed beside it are the ones it could not see.
LATE_ENDS = 64


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
_counters = cast(Table, BatchCounter.__table__)
_COUNTERS = tuple(f.name for f in fields(BatchDelta))


def _add_to_share(insert: Any) -> Any:
    """``INSERT ... ON CONFLICT DO UPDATE`` adding a delta to one share (the row made on first use)."""
    values = {name: bindparam(f"d_{name}", type_=_counters.c[name].type) for name in _COUNTERS}
    statement = insert(_counters).values(
        values | {"batch_id": bindparam("b_batch_id"), "shard": bindparam("b_shard")}
    )
    added = {name: _counters.c[name] + statement.excluded[name] for name in _COUNTERS}
    return statement.on_conflict_do_update(index_elements=["batch_id", "shard"], set_=added)


# Built once: every request's end runs one of these (the dialects spell the upsert alike, but
# SQLAlchemy builds it per dialect).
_ADD_TO_SHARE = {"postgresql": _add_to_share(postgresql.insert), "sqlite": _add_to_share(sqlite.insert)}


def _ended(table: Table) -> Any:
    """The sum of a counters row's ended columns."""
    return sum((table.c[name] for name in _ENDED_COLUMNS[1:]), table.c[_ENDED_COLUMNS[0]])


# Every request the batch has counted as ended, in its own row and its shares.
_ENDED = _ended(_batches) + (
    select(func.coalesce(func.sum(_ended(_counters)), 0))
    .where(_counters.c.batch_id == _batches.c.id)
    .scalar_subquery()
)
_PROGRESS = select(_batches.c.total_count, _batches.c.status, _ENDED).where(
    _batches.c.id == bindparam("b_batch_id")
)
_ADD_DELTA = (
    update(_batches)
    .where(_batches.c.id == bindparam("b_batch_id"))
    .values(
        {name: _batches.c[name] + bindparam(f"d_{name}", type_=_batches.c[name].type) for name in _COUNTERS}
    )
)


def counter_shard(key: str) -> int:
    """The share of its batch's counters a request's ends and usage are added to."""
    return zlib.crc32(key.encode()) % COUNTER_SHARDS


def apply_delta(
    session: Session,
    batch_id: str,
    delta: BatchDelta,
    now: datetime,
    also: Mapping[str, Any] | None = None,
    *,
    shard_key: str | None = None,
) -> None:
    """Add ``delta`` to the batch: to the share ``shard_key`` picks (a request's id), or to the
    batch's own row (setting ``also`` in the same statement: a cancel marks the batch here, not
    before, to keep the lock order); end the batch if that was its last request."""
    changes = delta.changes()
    if not changes and not also:
        return
    params = {f"d_{name}": getattr(delta, name) for name in _COUNTERS} | {"b_batch_id": batch_id}
    if shard_key is not None and not also:
        # Every request's end takes this path: one statement built once, adding every counter.
        statement = _ADD_TO_SHARE[session.get_bind().dialect.name]
        session.execute(statement, params | {"b_shard": counter_shard(shard_key)})
    elif also:
        session.execute(_ADD_DELTA.values(dict(also)), params)
    else:
        session.execute(_ADD_DELTA, params)
    if not (any(name in changes for name in _ENDED_COLUMNS) or also):
        return
    total, status, ended = session.execute(_PROGRESS, {"b_batch_id": batch_id}).one()
    if status not in OPEN_BATCH_STATUSES:
        return
    if ended >= total:
        end_if_counted(session, batch_id, now)
    elif total - ended <= LATE_ENDS:
        after_commit(session, lambda db: db.transact(lambda later: end_if_counted(later, batch_id, utcnow())))


def end_if_counted(session: Session, batch_id: str, now: datetime) -> bool:
    """End the batch if every request has ended (locking its row, last); whether it did."""
    # FOR NO KEY UPDATE: a share's insert holds a KEY SHARE lock on the batch row (its foreign
    # key) until it commits, which FOR UPDATE would wait for; ending the batch changes no key.
    batch = session.get(Batch, batch_id, populate_existing=True, with_for_update={"key_share": True})
    if batch is None:
        return False
    counted(session, [batch])
    return finish_if_done(session, batch, now)


def counted(session: Session, batches: Iterable[Batch]) -> None:
    """Set each batch's counters to its own row's plus its shares' (as loaded values: nothing is
    written). Call it on every batch that is shown or acted on by its counters."""
    by_id = {batch.id: batch for batch in batches}
    if not by_id:
        return
    rows = session.execute(
        select(
            _batches.c.id,
            *(
                (_batches.c[name] + func.coalesce(func.sum(_counters.c[name]), 0)).label(name)
                for name in _COUNTERS
            ),
        )
        .outerjoin(_counters, _counters.c.batch_id == _batches.c.id)
        .where(_batches.c.id.in_(list(by_id)))
        .group_by(_batches.c.id)
    )
    for row in rows:
        for name in _COUNTERS:
            value = getattr(row, name)
            # PostgreSQL sums integers as numeric: psycopg hands back Decimals for every column.
            set_committed_value(by_id[row.id], name, Decimal(value) if name == "cost_usd" else int(value))


def load_counted(session: Session, batch_id: str) -> Batch | None:
    """The batch, its counters ``counted``."""
    batch = session.get(Batch, batch_id)
    if batch is not None:
        counted(session, [batch])
    return batch


def end_counted_batches(session: Session, limit: int = 100) -> int:
    """End the open batches whose requests have all ended but that were not ended with the last
    of them (ends committed at once, or a worker that died between its commit and its look)."""
    done = session.scalars(
        select(_batches.c.id)
        .where(
            _batches.c.status.in_(OPEN_BATCH_STATUSES),
            _batches.c.total_count <= _ENDED,
        )
        .limit(limit)
    ).all()
    return sum(end_if_counted(session, batch_id, utcnow()) for batch_id in done)


def after_commit(session: Session, check: Any) -> None:
    """Run ``check(db)`` once the session's transaction has committed (``Database.transact``)."""
    session.info.setdefault("after_commit", []).append(check)


def finish_if_done(session: Session, batch: Batch, now: datetime) -> bool:
    """End the batch once every request has ended, and queue its webhook event. The batch's
    counters must be ``counted``."""
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
) -> Counter[tuple[str, str]]:
    """End every request of the batch still waiting its turn (cancel, expiry); running ones finish
    by themselves. Locks the queued request rows first (in id order, as every transaction that
    takes several does), then counts them on the batch. Returns how many were ended, by (route
    asked for, priority), for the metrics once the transaction commits."""
    queued = session.execute(
        select(LlmRequest.id, LlmRequest.error, LlmRequest.model, LlmRequest.priority)
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
    return Counter((row.model, row.priority) for row in queued)


def deployment_errors(error: dict[str, Any] | None) -> list[Any]:
    """Each deployment's last error as a request's error holds them (while it waits, and after)."""
    deployments = (error or {}).get("deployments")
    return deployments if isinstance(deployments, list) else []
