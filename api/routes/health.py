"""Liveness and readiness."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.context import AppContext, Context
from api.openapi import errors

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
    # What does not stop this process from accepting work but needs an operator's eye.
    warnings: dict[str, str] = {}


@router.get("/healthz", responses=errors("native", authenticated=False))
async def healthz() -> dict[str, str]:
    """The process answers. Async: it must not wait for a thread-pool slot (or the GIL hand-offs
    one costs) while uploads are parsed there."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "Not ready: a check failed."},
        **errors("native", authenticated=False),
    },
)
async def readyz(context: Context) -> JSONResponse:
    """The database and Redis are reachable: this process can accept work."""
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(context.db.ping)
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        await run_in_threadpool(context.redis.ping)
        checks["redis"] = "ok"
    except redis.RedisError as exc:
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    warnings = await run_in_threadpool(_cache_warnings, context)
    body = {"status": "ready" if ready else "not_ready", "checks": checks, "warnings": warnings}
    return JSONResponse(body, status_code=200 if ready else 503)


def _cache_warnings(context: AppContext) -> dict[str, str]:
    """The answer cache's Redis must evict (an LRU policy): with ``noeviction`` its entries pile up
    until their TTLs, and when that Redis is the broker's server, they eat the broker's memory."""
    if context.cache_redis is None:
        return {}
    try:
        policy = context.cache_redis.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.RedisError as exc:
        return {"cache_redis": f"unreachable: {type(exc).__name__} (cached answers are misses)"}
    if policy == "noeviction":
        return {
            "cache_redis": "maxmemory-policy is noeviction: cached answers are never evicted, only "
            "expired, and may fill this Redis. Point HEADRACE_CACHE_REDIS_URL at a Redis with "
            "maxmemory and an LRU policy (allkeys-lru), never at the broker's."
        }
    return {}
