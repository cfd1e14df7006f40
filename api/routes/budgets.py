"""``/v1/budgets``: what each tenant (or one tag of it) may spend per UTC day or month, its
degradation ladder, and where it stands now (``db/budgets.py`` keeps them; the workers enforce
them at admission, ``workers/budgets.py``).

Anyone may read their own tenant's budgets; an admin key reads every tenant's and sets and
deletes them (another tenant's name is a 404 to a tenant's key, its own a 403).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.budget_view import budget_views
from api.context import Context, CurrentCaller, ManagedTenant
from api.errors import ApiError
from api.openapi import errors
from broker_config.budget_state import budgets_changed
from db.budgets import BudgetError, budget_rules, delete_budget, set_budget
from db.models import Tenant

router = APIRouter(prefix="/v1/budgets", tags=["budgets"])


class LadderStep(BaseModel):
    at: float = Field(description="Share of the limit from which the step applies (0 < at <= 1).")
    action: str = Field(description="defer, downgrade, cache_only or refuse.")
    routes: dict[str, str] | None = Field(default=None, description="downgrade: route -> cheaper route.")


class BudgetIn(BaseModel):
    limit_usd: str | float = Field(description="What the period may spend, in USD.")
    period: str = Field(default="month", description="day or month (UTC).")
    tag: str | None = Field(default=None, description="Only requests with this tag, e.g. feature=search.")
    ladder: list[LadderStep] | str | None = Field(
        default=None,
        description="Steps, or the CLI's spelling 'defer@0.8,downgrade@0.9:smart>fast,refuse@1'.",
    )
    on_anomaly: str = Field(
        default="none", description="none, or pause: hold the tenant's bulk and default work."
    )


@router.get("", responses=errors("native"))
async def list_budgets(
    context: Context,
    caller: CurrentCaller,
    tenant: Annotated[str | None, Query(description="Admin keys: only this tenant.")] = None,
) -> dict[str, Any]:
    """The budgets and where each stands this period: spent, held by calls in flight, the share
    of the limit used, the ladder's steps reached, and when it resets."""

    def read() -> list[dict[str, Any]]:
        with context.db.session() as session:
            if caller.admin:
                ids = None
                if tenant is not None:
                    found = session.scalars(select(Tenant.id).where(Tenant.name == tenant)).all()
                    ids = list(found)
            else:
                ids = [caller.tenant.id]
            rules = budget_rules(session, ids)
            return [view.as_json() for view in budget_views(session, context.state_redis, rules)]

    return {"object": "list", "data": await run_in_threadpool(read)}


@router.put("/{tenant}/{name}", responses=errors("native", 403, 404))
async def put_budget(context: Context, tenant: ManagedTenant, name: str, budget: BudgetIn) -> dict[str, Any]:
    """Create or replace a tenant's budget (admin keys). It holds from the workers' next run on;
    the period's spend so far counts against a new limit."""
    ladder = budget.ladder
    steps = (
        ladder
        if isinstance(ladder, str) or ladder is None
        else [s.model_dump(exclude_none=True) for s in ladder]
    )
    try:
        rule = await run_in_threadpool(
            set_budget,
            context.db,
            tenant,
            name,
            limit_usd=budget.limit_usd,
            period=budget.period,
            tag=budget.tag,
            ladder=steps,
            on_anomaly=budget.on_anomaly,
        )
    except BudgetError as exc:
        status = 404 if str(exc).startswith("no tenant") else 400
        raise ApiError(status, "not_found" if status == 404 else "invalid_request", str(exc)) from None
    await run_in_threadpool(budgets_changed, context.state_redis)
    return rule.as_json()


@router.delete("/{tenant}/{name}", responses=errors("native", 403, 404))
async def remove_budget(context: Context, tenant: ManagedTenant, name: str) -> dict[str, Any]:
    """Delete a tenant's budget (admin keys); its work is no longer held by it."""
    if not await run_in_threadpool(delete_budget, context.db, tenant, name):
        raise ApiError(404, "not_found", f"tenant {tenant!r} has no budget named {name!r}")
    await run_in_threadpool(budgets_changed, context.state_redis)
    return {"tenant": tenant, "name": name, "deleted": True}
