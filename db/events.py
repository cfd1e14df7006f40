"""Events: what the pool noticed about a tenant (an anomaly found by ``workers/anomalies.py``), and
what follows from one. Each is kept in the ledger (``GET /v1/events``), queued as a signed
``anomaly.detected`` webhook to the tenant's URL and to the operator's (``HEADRACE_OPS_WEBHOOK_URL``),
and, where ``on_anomaly = "pause"`` says so (on the tenant, or on a budget of the tenant whose tag
the event is about), pauses the tenant: its bulk and default work is held (``workers/holds.py``)
until ``headrace tenants resume``, interactive work goes on. All of it in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.budgets import ON_ANOMALY
from db.engine import Database
from db.ids import new_id
from db.models import Budget, Event, Tenant
from db.types import utcnow
from db.webhooks import enqueue_event

ANOMALY_EVENT = "anomaly.detected"


class EventKind(StrEnum):
    SPEND_RATE = "spend_rate"  # spend per interval past its baseline
    TOKENS_PER_REQUEST = "tokens_per_request"  # input + output tokens per request past its baseline
    REQUEST_RATE = "request_rate"  # requests accepted per interval far over its baseline
    REPEATED_PROMPT = "repeated_prompt"  # one prompt more than K times in M minutes: a loop


@dataclass(frozen=True)
class Finding:
    """An anomaly as the detector found it, before the ledger says whether it is a new event."""

    tenant_id: str
    kind: EventKind
    subject: dict[str, Any]  # what it is about: {"feature": "search" | None, "prompt_hash": ...}
    detail: dict[str, Any]  # observed, baseline, factor, window_s...


def record_finding(
    session: Session, finding: Finding, now: datetime, *, cooldown_s: float, ops_url: str | None
) -> Event | None:
    """The finding as a new event with its webhooks and its action; None when an event of the same
    tenant, kind and feature is younger than the cooldown (one event per episode, not one per
    interval)."""
    if _has_recent_twin(session, finding, now - timedelta(seconds=cooldown_s)):
        return None
    tenant = session.get(Tenant, finding.tenant_id)
    if tenant is None:
        return None
    event = Event(
        id=new_id("evt"),
        tenant_id=tenant.id,
        kind=finding.kind.value,
        subject=finding.subject,
        detail=finding.detail,
        action="none",
        created_at=now,
    )
    pause_by = _pause_rule(session, tenant, finding.subject)
    if pause_by is not None:
        event.action = "paused"
        if tenant.paused_at is None:
            tenant.paused_at = now
            tenant.paused_reason = f"{describe(event)} (event {event.id}; on_anomaly = pause on {pause_by})"
    session.add(event)
    payload = {
        "type": ANOMALY_EVENT,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": event_view(event, tenant.name),
    }
    if tenant.webhook_url:
        enqueue_event(session, payload, tenant.webhook_url, now, tenant_id=tenant.id)
    if ops_url:
        enqueue_event(session, payload, ops_url, now, tenant_id=None)
    return event


def _has_recent_twin(session: Session, finding: Finding, since: datetime) -> bool:
    recent = session.scalars(
        select(Event.subject).where(
            Event.tenant_id == finding.tenant_id, Event.kind == finding.kind.value, Event.created_at > since
        )
    )
    return any(subject.get("feature") == finding.subject.get("feature") for subject in recent)


def _pause_rule(session: Session, tenant: Tenant, subject: dict[str, Any]) -> str | None:
    """What says this event pauses the tenant: the tenant's own on_anomaly, or a budget's whose tag
    (if it has one) is the event's (``feature=search`` for an event about feature search)."""
    if tenant.on_anomaly == "pause":
        return "the tenant"
    budgets = session.scalars(
        select(Budget)
        .where(Budget.tenant_id == tenant.id, Budget.on_anomaly == "pause")
        .order_by(Budget.name)
    )
    for budget in budgets:
        if budget.tag_key is None or subject.get(budget.tag_key) == budget.tag_value:
            return f"budget {budget.name!r}"
    return None


def describe(event: Event) -> str:
    """One sentence for people: the event's log line, webhook and pause reason."""
    feature = event.subject.get("feature")
    of = f"feature {feature!r}" if feature else "requests without a feature"
    detail = event.detail
    if event.kind == EventKind.REPEATED_PROMPT:
        return (
            f"one prompt ({event.subject.get('prompt_hash')}, {of}) came {detail['observed']} times in "
            f"{detail['window_s']:g} s, more than {detail['threshold']}"
        )
    what = {
        EventKind.SPEND_RATE: "spend (USD per interval)",
        EventKind.TOKENS_PER_REQUEST: "tokens per request",
        EventKind.REQUEST_RATE: "requests accepted per interval",
    }.get(EventKind(event.kind), event.kind)
    times = detail["observed"] / max(detail["baseline"], 1e-12)
    return (
        f"{what} of {of} at {detail['observed']:g}, {times:.1f}x its baseline of {detail['baseline']:g} "
        f"(an anomaly past {detail['factor']:g}x)"
    )


def event_view(event: Event, tenant_name: str) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "event",
        "type": ANOMALY_EVENT,
        "tenant": tenant_name,
        "kind": event.kind,
        "subject": event.subject,
        "detail": event.detail,
        "action": event.action,
        "message": describe(event),
        "created_at": int(event.created_at.timestamp()),
    }


def list_events(
    session: Session, *, tenant_id: str | None, kind: str | None, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Newest first (ids sort by time), a tenant's or (``tenant_id`` None) everyone's; whether more
    follow. ``after``: the last id of the previous page."""
    query = select(Event, Tenant.name).join(Tenant, Tenant.id == Event.tenant_id)
    if tenant_id is not None:
        query = query.where(Event.tenant_id == tenant_id)
    if kind:
        query = query.where(Event.kind == kind)
    if after:
        query = query.where(Event.id < after)
    rows = session.execute(query.order_by(Event.id.desc()).limit(limit + 1)).all()
    return [event_view(event, name) for event, name in rows[:limit]], len(rows) > limit


# --- A tenant's anomaly settings and pause -----------------------------------------------------------


def tenant_view(tenant: Tenant) -> dict[str, Any]:
    return {
        "object": "tenant",
        "name": tenant.name,
        "on_anomaly": tenant.on_anomaly,
        "paused": tenant.paused_at is not None,
        "paused_at": int(tenant.paused_at.timestamp()) if tenant.paused_at else None,
        "paused_reason": tenant.paused_reason,
    }


def _named(session: Session, name: str) -> Tenant:
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()
    if tenant is None:
        raise LookupError(f"no tenant named {name!r}")
    return tenant


def show_tenant(db: Database, name: str) -> dict[str, Any]:
    with db.session() as session:
        return tenant_view(_named(session, name))


def set_on_anomaly(db: Database, name: str, on_anomaly: str) -> dict[str, Any]:
    """What the tenant's anomalies do: ``pause`` its bulk and default work, or ``none``."""
    if on_anomaly not in ON_ANOMALY:
        raise ValueError(f"on_anomaly must be {' or '.join(ON_ANOMALY)}, not {on_anomaly!r}")

    def unit(session: Session) -> dict[str, Any]:
        tenant = _named(session, name)
        tenant.on_anomaly = on_anomaly
        return tenant_view(tenant)

    return db.transact(unit)


def pause_tenant(db: Database, name: str, reason: str) -> dict[str, Any]:
    """Hold the tenant's bulk and default work by hand (an anomaly's pause does the same)."""

    def unit(session: Session) -> dict[str, Any]:
        tenant = _named(session, name)
        if tenant.paused_at is None:
            tenant.paused_at, tenant.paused_reason = utcnow(), reason
        return tenant_view(tenant)

    return db.transact(unit)


def resume_tenant(db: Database, name: str) -> dict[str, Any]:
    """Let the tenant's held work go on: each held request runs at its next look (within
    HEADRACE_HOLD_RECHECK_S)."""

    def unit(session: Session) -> dict[str, Any]:
        tenant = _named(session, name)
        tenant.paused_at, tenant.paused_reason = None, None
        return tenant_view(tenant)

    return db.transact(unit)
