"""The statements of the ledger's per-request transactions (``workers.ledger``), built once.

Built per call, SQLAlchemy spent more CPU building, keying and compiling the same statements than
the rest of each transaction (py-spy); a statement object built once keeps its cache key, and the
Core forms on the tables skip the ORM's DML layer. Bind parameters named like a column they set
are prefixed (``b_`` in WHERE clauses, ``v_``/``d_`` for values and deltas): SQLAlchemy reserves a
column's own name for its SET value.
"""

from __future__ import annotations

from typing import cast

from sqlalchemy import Integer, String, Table, bindparam, func, insert, select, update

from db.models import Attempt, Batch, LlmRequest, Tenant
from db.states import RequestStatus
from db.types import Money

_requests, _attempts, _batches = (cast(Table, m.__table__) for m in (LlmRequest, Attempt, Batch))
_tenants = cast(Table, Tenant.__table__)
RUN_START = (
    select(
        _requests,
        _batches.c.cancelled_at,
        _batches.c.expires_at,
        _batches.c.tenant_id,
        _batches.c.metadata.label("batch_metadata"),
        _tenants.c.name.label("tenant_name"),
        _tenants.c.paused_at.label("tenant_paused_at"),
    )
    .join_from(_requests, _batches, _batches.c.id == _requests.c.batch_id)
    .outerjoin(_tenants, _tenants.c.id == _batches.c.tenant_id)
    .where(_requests.c.id == bindparam("request_id"))
    .with_for_update(of=_requests)
)
START_RUN = (
    update(_requests)
    .where(_requests.c.id == bindparam("b_request_id"))
    .values(
        status=RequestStatus.RUNNING.value,
        started_at=func.coalesce(_requests.c.started_at, bindparam("now", type_=_requests.c.started_at.type)),
        lease=bindparam("v_lease"),
        # Counts runs that have not ended cleanly; a deferral or a clean hand-back takes it back.
        deliveries=_requests.c.deliveries + 1,
    )
)
COUNT_ATTEMPT = (
    update(_requests)
    .where(
        _requests.c.id == bindparam("request_id"),
        _requests.c.status == RequestStatus.RUNNING.value,
        _requests.c.lease == bindparam("b_lease"),
    )
    .values(attempt_count=_requests.c.attempt_count + 1)
    .returning(
        _requests.c.attempt_count,
        _requests.c.batch_id,
        # Whether the batch was cancelled meanwhile, in the same round trip.
        select(_batches.c.cancelled_at).where(_batches.c.id == _requests.c.batch_id).scalar_subquery(),
    )
)
NEW_ATTEMPT = insert(_attempts)


LOCK_REQUEST_STATE = (
    select(_requests.c.status, _requests.c.lease, _requests.c.batch_id)
    .where(_requests.c.id == bindparam("request_id"))
    .with_for_update()
)
LOCK_ATTEMPT = (
    select(
        _attempts.c.lease,
        _attempts.c.outcome,
        _attempts.c.input_tokens,
        _attempts.c.output_tokens,
        _attempts.c.cost_usd,
    )
    .where(
        _attempts.c.request_id == bindparam("request_id"),
        _attempts.c.attempt_no == bindparam("attempt_no"),
    )
    .with_for_update()
)
RECORD_ATTEMPT = update(_attempts).where(
    _attempts.c.request_id == bindparam("b_request_id"), _attempts.c.attempt_no == bindparam("b_attempt_no")
)
ADD_USAGE = (
    update(_requests)
    .where(_requests.c.id == bindparam("b_request_id"))
    .values(
        input_tokens=_requests.c.input_tokens + bindparam("d_in", type_=Integer),
        output_tokens=_requests.c.output_tokens + bindparam("d_out", type_=Integer),
        cache_read_tokens=_requests.c.cache_read_tokens + bindparam("d_cache_read", type_=Integer),
        cache_write_tokens=_requests.c.cache_write_tokens + bindparam("d_cache_write", type_=Integer),
        cost_usd=_requests.c.cost_usd + bindparam("d_cost", type_=Money),
        overhead_cost_usd=_requests.c.overhead_cost_usd + bindparam("d_overhead", type_=Money),
        unpriced_attempts=_requests.c.unpriced_attempts + bindparam("d_unpriced", type_=Integer),
    )
)
# end_request's writes, for a request known to be running (so not yet ended).
END_REQUEST = ADD_USAGE.values(
    status=bindparam("status"),
    response=bindparam("response", type_=_requests.c.response.type),
    error=bindparam("error", type_=_requests.c.error.type),
    deployment=func.coalesce(bindparam("deployment", type_=String), _requests.c.deployment),
    ended_at=bindparam("ended_at", type_=_requests.c.ended_at.type),
    lease=None,
)
# What a request's end adds to its notes (rare: read, merged in Python, written back).
REQUEST_NOTES = select(_requests.c.notes).where(_requests.c.id == bindparam("request_id"))
SET_NOTES = (
    update(_requests)
    .where(_requests.c.id == bindparam("b_request_id"))
    .values(notes=bindparam("v_notes", type_=_requests.c.notes.type))
)
