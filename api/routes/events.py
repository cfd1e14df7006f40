"""``GET /v1/events``: what the pool noticed about a tenant (anomalies and runaway loops,
``workers/anomalies.py``), newest first. A tenant's key sees its own tenant's; an admin key sees
every tenant's and may narrow to one with ``tenant=NAME``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentCaller
from api.errors import ApiError
from api.openapi import errors
from api.schemas import list_page
from db.events import EventKind, list_events
from db.models import Tenant

router = APIRouter(prefix="/v1", tags=["events"])


@router.get("/events", responses=errors("native", 403))
async def events(
    context: Context,
    caller: CurrentCaller,
    kind: Annotated[
        EventKind | None,
        Query(description="spend_rate, tokens_per_request, request_rate or repeated_prompt."),
    ] = None,
    tenant: Annotated[str | None, Query(description="Admin keys: only this tenant.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(description="The last id of the previous page.")] = None,
) -> dict[str, Any]:
    """Each event: its tenant, kind, what it is about (feature, prompt hash), what was observed
    against which baseline, and what it did (``action``: none, or paused)."""
    if tenant is not None and not caller.admin:
        raise ApiError(403, "permission_error", "filtering by tenant needs an admin key")

    def read() -> dict[str, Any]:
        with context.db.session() as session:
            scope: str | None = caller.tenant.id
            if caller.admin:
                scope = (
                    None if tenant is None else session.scalar(select(Tenant.id).where(Tenant.name == tenant))
                )
                if tenant is not None and scope is None:
                    raise ApiError(404, "not_found", f"no tenant named {tenant!r}", param="tenant")
            data, more = list_events(
                session, tenant_id=scope, kind=kind.value if kind else None, after=after, limit=limit
            )
        return list_page(data, more)

    return await run_in_threadpool(read)
