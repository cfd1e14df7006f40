"""``/v1/tenants/{tenant}``: a tenant's anomaly settings and pause. Anyone may read their own tenant;
an admin key reads any, sets ``on_anomaly`` (``PATCH``), and pauses or resumes it (the same as
``headrace tenants set|pause|resume``). Another tenant is 404 to a tenant's key, as every other
tenant's thing is: its existence is not told."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.context import Context, ManagedTenant, VisibleTenant
from api.errors import ApiError
from api.openapi import errors
from db.events import pause_tenant, resume_tenant, set_on_anomaly, show_tenant

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


class TenantSettings(BaseModel):
    on_anomaly: Literal["none", "pause"] = Field(
        description="pause: an anomaly of the tenant holds its bulk and default work until resumed."
    )


class PauseReason(BaseModel):
    reason: str = Field(default="paused by an operator", max_length=1000)


def _found(call: Any, *args: Any) -> dict[str, Any]:
    try:
        result: dict[str, Any] = call(*args)
    except LookupError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return result


@router.get("/{tenant}", responses=errors("native", 404))
async def get_tenant(tenant: VisibleTenant, context: Context) -> dict[str, Any]:
    """Its on_anomaly, and whether it is paused, since when and why."""
    return await run_in_threadpool(_found, show_tenant, context.db, tenant)


@router.patch("/{tenant}", responses=errors("native", 403, 404))
async def update_tenant(tenant: ManagedTenant, settings: TenantSettings, context: Context) -> dict[str, Any]:
    """Set what the tenant's anomalies do besides their event and webhook: pause, or none."""
    return await run_in_threadpool(_found, set_on_anomaly, context.db, tenant, settings.on_anomaly)


@router.post("/{tenant}/pause", responses=errors("native", 403, 404))
async def pause(tenant: ManagedTenant, context: Context, body: PauseReason | None = None) -> dict[str, Any]:
    """Hold the tenant's bulk and default work now, as an anomaly with on_anomaly = pause would."""
    reason = (body or PauseReason()).reason
    return await run_in_threadpool(_found, pause_tenant, context.db, tenant, reason)


@router.post("/{tenant}/resume", responses=errors("native", 403, 404))
async def resume(tenant: ManagedTenant, context: Context) -> dict[str, Any]:
    """Let its held work go on: each held request runs at its next look (HEADRACE_HOLD_RECHECK_S)."""
    return await run_in_threadpool(_found, resume_tenant, context.db, tenant)
