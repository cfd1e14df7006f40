"""The pool's deployments and the live state of their rate-limit buckets."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentTenant
from api.openapi import errors
from broker_config.bucket_state import delayed_requests, read_fallbacks, read_state

router = APIRouter(prefix="/v1", tags=["deployments"])


@router.get("/deployments", responses=errors("native"))
async def list_deployments(context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    """Per deployment: limits (configured, learned from the provider, effective), what is left,
    what calls in flight hold, pause and rate factor after 429s, circuit breaker, and counters;
    and per route, how often its chain fell back to each deployment."""
    del tenant  # any valid key may look; nothing here belongs to a tenant

    def read() -> dict[str, Any]:
        recovery = context.settings.rate_factor_recovery_per_s
        states = [
            asdict(read_state(context.state_redis, d, recovery_per_s=recovery))
            for d in context.config.deployments
        ]
        return {
            "object": "list",
            "data": states,
            "delayed_requests": delayed_requests(context.redis),
            "fallbacks": read_fallbacks(context.state_redis),
        }

    return await run_in_threadpool(read)
