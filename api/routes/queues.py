"""The pool's queues: how many requests wait at each priority, and for how long."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentTenant
from api.openapi import errors
from broker_config.bucket_state import delayed_requests
from broker_config.queue_state import read_queues

router = APIRouter(prefix="/v1", tags=["deployments"])


@router.get("/queues", responses=errors("native"))
async def list_queues(context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    """Per priority: messages waiting in the broker and the age of the oldest; and the requests
    parked in the delay queue until a deployment has room. Pool-wide, like ``/v1/deployments``."""
    del tenant  # any valid key may look; nothing here belongs to a tenant

    def read() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [asdict(q) for q in read_queues(context.redis)],
            "delayed_requests": delayed_requests(context.redis),
        }

    return await run_in_threadpool(read)
