"""Events queued for delivery to a tenant's webhook (the worker's housekeeper sends them): a batch's
end, an anomaly (``db/events.py``, which also queues the operator's copy)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from db.ids import new_id
from db.models import Batch, Tenant, WebhookDelivery
from db.types import format_usd


def batch_event(batch: Batch, now: datetime) -> dict[str, Any]:
    """The event body: what a receiver needs to act without calling back (it still may)."""
    ended = batch.succeeded_count + batch.failed_count + batch.cancelled_count + batch.expired_count
    return {
        "type": f"batch.{batch.status}",
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {
            "id": batch.id,
            "api": batch.api,
            "status": batch.status,
            "metadata": batch.metadata_,
            "request_counts": {
                "total": batch.total_count,
                "completed": batch.succeeded_count,
                "failed": batch.failed_count,
                "cancelled": batch.cancelled_count,
                "expired": batch.expired_count,
                "in_progress": batch.total_count - ended,
            },
            "usage": {"input_tokens": batch.input_tokens, "output_tokens": batch.output_tokens},
            "cost_usd": format_usd(batch.cost_usd),
            "created_at": int(batch.created_at.timestamp()),
            "ended_at": int(batch.ended_at.timestamp()) if batch.ended_at else None,
        },
    }


def enqueue_batch_event(session: Session, batch: Batch, now: datetime) -> WebhookDelivery | None:
    """Queue the batch's end event for its webhook (its own URL, else its tenant's default)."""
    url = batch.webhook_url
    if url is None:
        tenant = session.get(Tenant, batch.tenant_id)
        url = tenant.webhook_url if tenant else None
    if not url:
        return None
    payload = batch_event(batch, now)
    return enqueue_event(session, payload, url, now, tenant_id=batch.tenant_id, batch_id=batch.id)


def enqueue_event(
    session: Session,
    payload: dict[str, Any],
    url: str,
    now: datetime,
    *,
    tenant_id: str | None,
    batch_id: str | None = None,
) -> WebhookDelivery:
    """Queue one event for one URL. ``tenant_id`` None: the operator's copy (HEADRACE_OPS_WEBHOOK_URL),
    signed with the operator's secret and listed to no tenant; ``batch_id`` None: no batch's event."""
    delivery = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=tenant_id,
        batch_id=batch_id,
        event_type=payload["type"],
        url=url,
        payload=payload,
        state="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    return delivery
