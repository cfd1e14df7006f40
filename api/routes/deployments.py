"""The pool's deployments and the live state of their rate-limit buckets."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentTenant
from api.openapi import errors
from broker_config.bucket_state import delayed_requests, read_fallbacks, read_state
from db.reports import recent_usage
from db.types import format_usd, utcnow

router = APIRouter(prefix="/v1", tags=["deployments"])


@router.get("/deployments", responses=errors("native"))
async def list_deployments(context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    """Per deployment: limits (configured, learned from the provider, effective), what is left,
    what calls in flight hold, pause and rate factor after 429s, circuit breaker, counters, and
    the calls started in the last minute with their tokens and cost (from the ledger);
    and per route, how often its chain fell back to each deployment."""
    del tenant  # any valid key may look; nothing here belongs to a tenant

    def read() -> dict[str, Any]:
        recovery = context.settings.rate_factor_recovery_per_s
        states = [
            asdict(read_state(context.state_redis, d, recovery_per_s=recovery))
            for d in context.config.deployments
        ]
        with context.db.session() as session:
            since = utcnow() - timedelta(seconds=60)
            recent = recent_usage(session, [s["name"] for s in states], since)
        for state in states:
            used = recent.get(state["name"])
            state["last_minute"] = {
                "calls": used.calls if used else 0,
                "input_tokens": used.input_tokens if used else 0,
                "output_tokens": used.output_tokens if used else 0,
                "cost_usd": format_usd(used.cost_usd) if used else "0",
            }
        return {
            "object": "list",
            "data": states,
            "delayed_requests": delayed_requests(context.redis),
            "fallbacks": read_fallbacks(context.state_redis),
        }

    return await run_in_threadpool(read)
