"""``GET /v1/usage``: what the requests of a period cost, grouped as asked (``db/usage.py``).

A tenant's key sees its own tenant; an admin key (``headrace keys create --admin``) sees every
tenant, may group by tenant, and may narrow to one with ``tenant=NAME``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentCaller
from api.errors import ApiError
from api.openapi import errors
from db.models import Tenant
from db.types import utcnow
from db.usage import FIXED_DIMENSIONS, GRANULARITIES, UsageQuery, as_json, usage_report

router = APIRouter(prefix="/v1", tags=["usage"])
DEFAULT_PERIOD = timedelta(days=7)
_RELATIVE = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(value: str, name: str, now: datetime) -> datetime:
    """``7d`` / ``24h`` / ``30m`` / ``2w`` before now, or an ISO 8601 date or time (UTC unless it
    says otherwise)."""
    relative = _RELATIVE.match(value.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative[2]]: int(relative[1])})
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(
            400,
            "invalid_request",
            f"{name}: {value!r} is neither a time (2026-11-01, 2026-11-01T12:00:00Z) nor a span before "
            "now (30m, 24h, 7d, 2w)",
            param=name,
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@router.get("/usage", responses=errors("native", 403))
async def usage(
    context: Context,
    caller: CurrentCaller,
    group_by: Annotated[
        str, Query(description="Comma-separated: tenant, route, deployment, priority, and attribution keys.")
    ] = "",
    since: Annotated[
        str | None, Query(description="Start (inclusive): a time, or 7d, 24h... before now.")
    ] = None,
    until: Annotated[str | None, Query(description="End (exclusive): a time, or a span before now.")] = None,
    granularity: Annotated[str | None, Query(description="day or hour: one group per period too.")] = None,
    tenant: Annotated[str | None, Query(description="Admin keys: only this tenant.")] = None,
) -> dict[str, Any]:
    """Per group: requests and how they ended, calls, input and output tokens (sum, and mean, p50
    and p95 per request), of the input the tokens read from and written to the providers' prompt
    caches, cost, the overhead spent on calls that did not answer (retried, fallen back, refused,
    lost), and cost per successful request; with the totals."""
    now = utcnow()
    tags = context.settings.attribution_tags
    dimensions = [d.strip() for d in group_by.split(",") if d.strip()]
    allowed = (*FIXED_DIMENSIONS, *tags)
    unknown = [d for d in dimensions if d not in allowed]
    if unknown or len(set(dimensions)) != len(dimensions):
        raise ApiError(
            400,
            "invalid_request",
            f"group_by: {', '.join(unknown) or 'a dimension twice'}: choose from {', '.join(allowed)} "
            "(attribution keys: HEADRACE_ATTRIBUTION_KEYS)",
            param="group_by",
        )
    if granularity is not None and granularity not in GRANULARITIES:
        raise ApiError(400, "invalid_request", "granularity: day or hour", param="granularity")
    if not caller.admin and ("tenant" in dimensions or tenant is not None):
        raise ApiError(403, "permission_error", "grouping or filtering by tenant needs an admin key")
    end = parse_moment(until, "until", now) if until else now
    start = parse_moment(since, "since", now) if since else end - DEFAULT_PERIOD
    if start >= end:
        raise ApiError(400, "invalid_request", "since must come before until", param="since")

    def read() -> dict[str, Any]:
        with context.db.session() as session:
            scope: list[str] | None = [caller.tenant.id]
            if caller.admin:
                scope = None if tenant is None else _tenant_ids(session, tenant)
            query = UsageQuery(start, end, tuple(dimensions), granularity, scope)
            return as_json(usage_report(session, query, tags))

    return await run_in_threadpool(read)


def _tenant_ids(session: Any, name: str) -> list[str]:
    found = session.scalar(select(Tenant.id).where(Tenant.name == name))
    if found is None:
        raise ApiError(404, "not_found", f"no tenant named {name!r}", param="tenant")
    return [found]
