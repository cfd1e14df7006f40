"""Delivering batch events to tenants' webhooks, signed per the Standard Webhooks spec.

Each delivery is POSTed with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
headers (the ``standardwebhooks`` library signs with the tenant's secret), never following
redirects, and retried on any answer but 2xx along ``HEADRACE_WEBHOOK_RETRY_SCHEDULE_S``; then it
is marked failed. Every POST is recorded. The URL is checked against SSRF again before each POST.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from broker_config.settings import Settings
from broker_config.webhook_urls import UnsafeWebhookUrl, check_webhook_url
from db.engine import Database
from db.models import Tenant, WebhookAttempt, WebhookDelivery
from db.tenants import webhook_secret
from db.types import utcnow

log = logging.getLogger(__name__)
USER_AGENT = "Headrace-Webhooks/1"


class WebhookSender:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.schedule_s = [float(x) for x in settings.webhook_retry_schedule_s.split(",") if x.strip()]
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_s, follow_redirects=False, headers={"User-Agent": USER_AGENT}
        )

    def deliver_due(self, limit: int = 20) -> int:
        """Send every delivery whose time has come; returns how many were attempted."""
        with self.db.session() as session:
            due = list(
                session.scalars(
                    select(WebhookDelivery.id)
                    .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= utcnow())
                    .order_by(WebhookDelivery.next_attempt_at)
                    .limit(limit)
                )
            )
        return sum(self.deliver(delivery_id) for delivery_id in due)

    def _claim(self, delivery_id: str) -> tuple[WebhookDelivery, str] | None:
        """Take the delivery for one attempt (another worker skips it meanwhile); its secret."""

        def unit(session: Session) -> tuple[WebhookDelivery, str] | None:
            now = utcnow()
            claimed = session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                )
                .values(next_attempt_at=now + timedelta(seconds=self.settings.webhook_timeout_s * 3))
            )
            if not claimed.rowcount:  # type: ignore[attr-defined]
                return None
            delivery = session.get(WebhookDelivery, delivery_id)
            tenant = session.get(Tenant, delivery.tenant_id) if delivery else None
            if delivery is None or tenant is None:
                return None
            return delivery, webhook_secret(session, tenant)

        return self.db.transact(unit)

    def deliver(self, delivery_id: str) -> bool:
        claimed = self._claim(delivery_id)
        if claimed is None:
            return False
        delivery, secret = claimed
        status, error, started = None, None, time.monotonic()
        try:
            check_webhook_url(delivery.url, self.settings.webhook_allow_hosts)
            body = json.dumps(delivery.payload, separators=(",", ":"))
            sent_at = utcnow()
            signature = Webhook(secret).sign(delivery.id, sent_at, body)
            response = self.http.post(
                delivery.url,
                content=body,
                headers={
                    "content-type": "application/json",
                    "webhook-id": delivery.id,
                    "webhook-timestamp": str(int(sent_at.timestamp())),
                    "webhook-signature": signature,
                },
            )
            status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        except UnsafeWebhookUrl as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._record(
            delivery.id,
            status,
            error,
            round((time.monotonic() - started) * 1000),
            final=error is not None and error.startswith("refused"),
        )
        return True

    def _record(
        self, delivery_id: str, status: int | None, error: str | None, duration_ms: int, *, final: bool
    ) -> None:
        def unit(session: Session) -> None:
            now = utcnow()
            delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
            if delivery is None:
                return
            delivery.attempts += 1
            session.add(
                WebhookAttempt(
                    delivery_id=delivery_id,
                    attempt_no=delivery.attempts,
                    at=now,
                    status=status,
                    error=error,
                    duration_ms=duration_ms,
                )
            )
            delivery.last_status, delivery.last_error = status, error
            if error is None:
                delivery.state, delivery.delivered_at, delivery.next_attempt_at = "delivered", now, None
            elif final or delivery.attempts > len(self.schedule_s):
                delivery.state, delivery.next_attempt_at = "failed", None
                log.warning("webhook %s to %s failed for good: %s", delivery_id, delivery.url, error)
            else:
                delivery.next_attempt_at = now + timedelta(seconds=self.schedule_s[delivery.attempts - 1])

        self.db.transact(unit)
