"""Holding a request back before any call: its tenant's budget says wait (``workers/budgets.py``),
or its tenant is paused after an anomaly (``workers/anomalies.py``). A held request waits in the
delay queue, not in a worker slot, and is looked at again every ``recheck_s`` (a budget raised or
a tenant resumed takes effect then), until its batch's window (or its route's deadline) ends:
then it ends ``expired``, saying what held it. Never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from db.states import RequestStatus
from db.types import utcnow
from workers import ledger, observe
from workers.attempts import end_without_call
from workers.leases import Lease
from workers.run_deps import Deps

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Hold:
    """Why a request may not run now, and how long until it is worth looking again."""

    kind: str  # budget_deferred | budget_exhausted | tenant_paused
    message: str
    recheck_s: float
    detail: dict[str, object] | None = None


def hold(
    deps: Deps, run: ledger.RunStart, lease: Lease, why: Hold, *, deadline: datetime, route: str
) -> None:
    """Park the request for ``why.recheck_s``, or end it ``expired`` now if its deadline comes
    first. The reason is its error while it waits (its batch shows why it is not moving)."""
    reason = {"kind": why.kind, "message": why.message, **(why.detail or {})}
    if utcnow() + timedelta(seconds=why.recheck_s) >= deadline:
        expired = {
            **reason,
            "kind": "expired",
            "held_by": why.kind,
            "message": f"its deadline came while it was held: {why.message}",
        }
        end_without_call(deps, run, lease, RequestStatus.EXPIRED, expired)
        return
    if ledger.defer_run(deps.db, run.request_id, lease.token, waiting=reason):
        deps.delays.park(run.request_id, run.priority, why.recheck_s)
        observe.parked(route, why.kind)
        log.info("request held", kind=why.kind, recheck_s=round(why.recheck_s, 1))
