"""Checking a webhook URL given at submit time (SSRF), off the event loop (it resolves DNS)."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from api.context import AppContext
from api.errors import ApiError
from broker_config.webhook_urls import UnsafeWebhookUrl, check_webhook_url


async def checked_webhook_url(context: AppContext, url: object) -> str | None:
    """The URL if it may be used, None if none was given; a 400 naming the reason otherwise."""
    if url in (None, ""):
        return None
    if not isinstance(url, str):
        raise ApiError(400, "invalid_request", "webhook_url must be a string")
    try:
        return await run_in_threadpool(check_webhook_url, url, context.settings.webhook_allow_hosts)
    except UnsafeWebhookUrl as exc:
        raise ApiError(400, "invalid_webhook_url", str(exc)) from None
