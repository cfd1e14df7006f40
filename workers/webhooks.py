"""Delivering events (a batch's end, an anomaly) to webhooks, signed per the Standard Webhooks spec.

Each delivery is POSTed with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
headers (the ``standardwebhooks`` library signs with the tenant's secret), never following
redirects, and retried on any answer but 2xx along ``HEADRACE_WEBHOOK_RETRY_SCHEDULE_S``; then it
is marked failed. Every POST is recorded. The URL is checked against SSRF again before each POST,
and the POST goes to an address that check passed, never to the name resolved anew (DNS
rebinding): the name travels only as the Host header and, for https, as the TLS server name that
the certificate is verified against. URLs are logged by scheme and host only (they carry tokens).
A delivery of no tenant is the operator's copy of an event (``HEADRACE_OPS_WEBHOOK_URL``): signed
with ``HEADRACE_OPS_WEBHOOK_SECRET``, and its host is allowed whatever it is.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
import time
from contextvars import ContextVar
from datetime import timedelta
from urllib.parse import urlsplit

import certifi
import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from broker_config.settings import Settings
from broker_config.webhook_urls import UnsafeWebhookUrl, WebhookTarget, redact_url, resolve_webhook_target
from db.engine import Database
from db.models import Tenant, WebhookAttempt, WebhookDelivery
from db.tenants import webhook_secret
from db.types import utcnow
from workers import observe

log = logging.getLogger(__name__)
USER_AGENT = "Headrace-Webhooks/1"
_DELIVERING: ContextVar[bool] = ContextVar("headrace_webhook_delivering", default=False)


class _RedactDeliveryUrls(logging.Filter):
    """httpx logs every request's whole URL at INFO; a webhook's carries its token."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if _DELIVERING.get() and isinstance(args, tuple) and len(args) >= 2:
            record.args = (args[0], redact_url(str(args[1])), *args[2:])
        return True


class WebhookSender:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.schedule_s = [float(x) for x in settings.webhook_retry_schedule_s.split(",") if x.strip()]
        self.http = httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
            verify=_tls_context(),
            # No proxy from the environment: it would resolve the name itself, and an HTTP tunnel
            # does not carry our SNI. No kept connections: pooled by address, one opened for a
            # name could otherwise carry another name's request, its certificate never checked.
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        httpx_log = logging.getLogger("httpx")
        if not any(isinstance(f, _RedactDeliveryUrls) for f in httpx_log.filters):
            httpx_log.addFilter(_RedactDeliveryUrls())

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

    def _claim(self, delivery_id: str) -> tuple[WebhookDelivery, str | None] | None:
        """Take the delivery for one attempt (another worker skips it meanwhile); its secret."""

        def unit(session: Session) -> tuple[WebhookDelivery, str | None] | None:
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
            if delivery is not None and delivery.tenant_id is None:  # the operator's copy of an event
                return delivery, self.settings.ops_webhook_secret
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
        allow = self.settings.webhook_allow_hosts
        if delivery.tenant_id is None:
            # The operator's own URL (HEADRACE_OPS_WEBHOOK_URL): trusted wherever it points.
            allow = f"{allow or ''},{urlsplit(delivery.url).hostname or ''}"
        try:
            if secret is None:
                raise UnsafeWebhookUrl("HEADRACE_OPS_WEBHOOK_SECRET is not set: nothing to sign with")
            target = resolve_webhook_target(delivery.url, allow)
            body = json.dumps(delivery.payload, separators=(",", ":"))
            sent_at = utcnow()
            signature = Webhook(secret).sign(delivery.id, sent_at, body)
            headers = {
                "content-type": "application/json",
                "webhook-id": delivery.id,
                "webhook-timestamp": str(int(sent_at.timestamp())),
                "webhook-signature": signature,
            }
            status = self._post(target, body, headers).status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        except UnsafeWebhookUrl as exc:
            error = f"refused: {exc}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {_scrub(str(exc), delivery.url)}"
        self._record(
            delivery.id,
            status,
            error,
            round((time.monotonic() - started) * 1000),
            final=error is not None and error.startswith("refused"),
        )
        return True

    def _post(self, target: WebhookTarget, body: str, headers: dict[str, str]) -> httpx.Response:
        """POST to the checked addresses in turn (the next only when one refuses the connection)."""
        url = httpx.URL(target.url)
        pinned_headers = {**headers, "host": url.netloc.decode("ascii")}
        named = not _is_literal(target.host)
        extensions = {"sni_hostname": target.host} if named and target.scheme == "https" else {}
        failure: httpx.TransportError | None = None
        token = _DELIVERING.set(True)
        try:
            for address in target.addresses:
                try:
                    return self.http.post(
                        url.copy_with(host=str(address)),
                        content=body,
                        headers=pinned_headers,
                        extensions=extensions,
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    failure = exc
        finally:
            _DELIVERING.reset(token)
        assert failure is not None, "resolve_webhook_target returns at least one address"
        raise failure

    def _record(
        self, delivery_id: str, status: int | None, error: str | None, duration_ms: int, *, final: bool
    ) -> None:
        def unit(session: Session) -> str | None:
            now = utcnow()
            delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
            if delivery is None:
                return None
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
                return "delivered"
            if final or delivery.attempts > len(self.schedule_s):
                delivery.state, delivery.next_attempt_at = "failed", None
                log.warning(
                    "webhook %s to %s failed for good: %s", delivery_id, redact_url(delivery.url), error
                )
                return "failed"
            delivery.next_attempt_at = now + timedelta(seconds=self.schedule_s[delivery.attempts - 1])
            return "retry"

        outcome = self.db.transact(unit)
        if outcome is not None:
            observe.webhook_delivery(outcome)


def _tls_context() -> ssl.SSLContext:
    """httpx's default (certifi's roots, or SSL_CERT_FILE / SSL_CERT_DIR when set), built here
    because ``trust_env=False`` would also drop those two variables."""
    cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    return ssl.create_default_context(cafile=certifi.where())


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _scrub(text: str, url: str) -> str:
    """An HTTP error's text without the webhook URL in it (some name the URL they failed on)."""
    return text.replace(url, redact_url(url))
