"""The tenant's webhook deliveries: list them, look at their attempts, deliver one again."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.context import Context, CurrentTenant, ReadSession
from api.errors import not_found
from api.openapi import errors
from api.schemas import list_page
from db.models import WebhookAttempt, WebhookDelivery
from db.types import utcnow

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


def _delivery(delivery: WebhookDelivery, attempts: list[WebhookAttempt] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": delivery.id,
        "object": "webhook_delivery",
        "batch_id": delivery.batch_id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_status": delivery.last_status,
        "last_error": delivery.last_error,
        "created_at": int(delivery.created_at.timestamp()),
        "delivered_at": int(delivery.delivered_at.timestamp()) if delivery.delivered_at else None,
        "next_attempt_at": int(delivery.next_attempt_at.timestamp()) if delivery.next_attempt_at else None,
    }
    if attempts is not None:
        view["attempt_log"] = [
            {
                "attempt": a.attempt_no,
                "at": int(a.at.timestamp()),
                "status": a.status,
                "error": a.error,
                "duration_ms": a.duration_ms,
            }
            for a in attempts
        ]
    return view


def _own(session: Session, tenant_id: str, delivery_id: str) -> WebhookDelivery:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.tenant_id != tenant_id:
        raise not_found("webhook delivery", delivery_id)
    return delivery


@router.get("/deliveries", responses=errors("native"))
def list_deliveries(
    session: ReadSession,
    tenant: CurrentTenant,
    batch_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict[str, Any]:
    """Newest first; ``after`` is the last id of the previous page."""
    query = select(WebhookDelivery).where(WebhookDelivery.tenant_id == tenant.id)
    if batch_id:
        query = query.where(WebhookDelivery.batch_id == batch_id)
    if after:
        query = query.where(WebhookDelivery.id < after)
    found = list(session.scalars(query.order_by(WebhookDelivery.id.desc()).limit(limit + 1)))
    data = [_delivery(d) for d in found[:limit]]
    return list_page(data, len(found) > limit)


@router.get("/deliveries/{delivery_id}", responses=errors("native", 404))
def get_delivery(delivery_id: str, session: ReadSession, tenant: CurrentTenant) -> dict[str, Any]:
    """One delivery with every attempt made."""
    delivery = _own(session, tenant.id, delivery_id)
    attempts = list(
        session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.attempt_no)
        )
    )
    return _delivery(delivery, attempts)


@router.post("/deliveries/{delivery_id}/redeliver", responses=errors("native", 404))
async def redeliver(delivery_id: str, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    """One more attempt now, whatever its state, with the same webhook-id (a receiver can tell it is
    the same event). A delivery that had already spent its retries stays failed if this fails."""

    def unit(session: Session) -> dict[str, Any]:
        delivery = _own(session, tenant.id, delivery_id)
        delivery.state, delivery.next_attempt_at = "pending", utcnow()
        return _delivery(delivery)

    return await run_in_threadpool(context.db.transact, unit)
