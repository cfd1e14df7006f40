"""The FastAPI app: the front door. Built by ``create_app``; ``headrace api`` serves it."""

from __future__ import annotations

import gc

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import metrics_view
from api.body_limit import BodyLimitMiddleware
from api.context import AppContext
from api.errors import install_error_handlers
from api.log_redaction import redact_access_log
from api.metrics_view import pool_registry
from api.openapi import install_openapi
from api.routes import (
    anthropic_compat,
    batches,
    budgets,
    deployments,
    events,
    health,
    openai_compat,
    queues,
    tenants,
    usage,
    webhooks,
)
from broker_config import tracing
from broker_config.celery_app import configure as configure_broker
from broker_config.deployments import load_config
from broker_config.redis_clients import cache_client, settings_client, state_client
from broker_config.settings import Settings, get_settings
from db.engine import settings_database


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API for ``settings``; a bad deployments file fails here, at start, with its location."""
    settings = settings or get_settings()
    # Traces when the OTEL_* variables ask for them (once per process; exported at exit too).
    tracing.configure("headrace-api")
    # /docs and /redoc load Swagger UI and ReDoc from the API itself (under /static-offline-docs),
    # never from a CDN, so they work on a private network. fastapi-offline ships Swagger UI 5:
    # swagger-ui-bundle's 4.x cannot render an OpenAPI 3.1 document, which FastAPI writes.
    app = FastAPIOffline(
        title="Headrace",
        summary="Batches of LLM requests, run at the rate each provider can bear, every cent accounted for.",
        version="0.1.0",
    )
    app.state.headrace = AppContext(
        settings=settings,
        db=settings_database(settings),
        config=load_config(settings.config),
        redis=settings_client(settings, socket_timeout=2, socket_connect_timeout=2),
        state_redis=state_client(settings, socket_timeout=2, socket_connect_timeout=2),
        cache_redis=cache_client(settings, socket_timeout=2, socket_connect_timeout=2),
    )
    app.state.pool_metrics = pool_registry(app.state.headrace)
    configure_broker(settings)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        upload_bytes=settings.max_batch_bytes,
        request_bytes=settings.max_request_bytes,
    )
    redact_access_log()
    app.include_router(health.router)
    app.include_router(metrics_view.router)
    app.include_router(batches.router)
    app.include_router(deployments.router)
    app.include_router(queues.router)
    app.include_router(usage.router)
    app.include_router(budgets.router)
    app.include_router(events.router)
    app.include_router(tenants.router)
    app.include_router(webhooks.router)
    app.include_router(openai_compat.router)
    app.include_router(anthropic_compat.router)
    install_openapi(app)
    # Everything imported and built so far lives as long as the process: out of the collector's
    # sight, a full collection walks only what requests create (it walked ~1M start-up objects,
    # 100+ ms of held GIL, the first time one ran under load).
    gc.collect()
    gc.freeze()
    return app
