"""Celery tasks: thin shells that hand a request id to the pipeline, and the worker's threads."""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from typing import Any

import redis
import structlog
from celery.signals import worker_init, worker_ready, worker_shutdown
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from broker_config import keys, metrics, tracing
from broker_config.celery_app import app
from broker_config.deployments import DeploymentsConfig, load_config
from broker_config.publisher import publish_requests
from broker_config.queues import RUN_REQUEST_TASK
from broker_config.redis_clients import cache_client, settings_client, state_client
from broker_config.settings import Settings, get_settings
from db.engine import DEFAULT_HOLD_S, settings_database
from db.retention import SUGGESTED_INTERVAL_S
from db.states import Priority
from workers import observe, spans
from workers.admission import Bucket, BucketPolicy
from workers.anomalies import AnomalyDetector
from workers.answer_cache import AnswerCache
from workers.breaker import BreakerPolicy, FallbackCounter
from workers.budgets import Budgets
from workers.cached_runs import CacheDeps
from workers.delays import DelayPublisher, DelayQueue
from workers.housekeeping import (
    Housekeeper,
    Job,
    LostMessageSweep,
    OrphanSweep,
    RetentionSweep,
    expire_batches,
    sweep_unpublished,
)
from workers.leases import LeaseKeeper, Leases
from workers.output_estimate import OutputPolicy
from workers.pipeline import Deps, longest_run_s, recovery_claim, run_request
from workers.providers import default_adapters
from workers.semantic_cache import SemanticCache
from workers.single_flight import Flights
from workers.webhooks import WebhookSender

log = logging.getLogger(__name__)
# Housekeeping threads that touch the ledger ("sweeps" and "webhooks"; "delays" only publishes).
LEDGER_HOUSEKEEPERS = 2
# One INFO line per provider call from the HTTP clients would drown the worker's own log.
for _noisy in ("httpx", "httpx2"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


# Short timeouts, a few quick retries, never a long hang.
QUICK: dict[str, Any] = {
    "socket_timeout": 2,
    "socket_connect_timeout": 2,
    "health_check_interval": 30,
    "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
}


def state_redis(settings: Settings) -> redis.Redis:
    """The client for buckets, breakers, leases and fallback counts (HEADRACE_STATE_REDIS_URL)."""
    return state_client(settings, retry=Retry(ExponentialBackoff(cap=1, base=0.05), 3), **QUICK)


def broker_redis(settings: Settings) -> redis.Redis:
    """The client for the delay queue, the housekeeping locks and the broker's own lists."""
    return settings_client(settings, retry=Retry(ExponentialBackoff(cap=1, base=0.05), 3), **QUICK)


def lease_redis(settings: Settings) -> redis.Redis:
    """The lease keeper's own connection: one second to answer, no retries (it tries again soon)."""
    return state_client(settings, socket_timeout=1, socket_connect_timeout=1)


def bucket_policy(settings: Settings) -> BucketPolicy:
    return BucketPolicy(
        floors={
            Priority.INTERACTIVE: 0.0,
            Priority.DEFAULT: settings.bucket_floor_default,
            Priority.BULK: settings.bucket_floor_bulk,
        },
        floor_idle_s=settings.bucket_floor_idle_s,
        # A reservation outlives its call: each deployment's own timeouts (these for those that
        # set none) plus a margin, so that a slow call still gets its refund.
        call_timeout_s=settings.call_timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        reservation_margin_s=settings.reservation_margin_s,
        factor_drop=settings.rate_factor_on_429,
        factor_min=settings.rate_factor_min,
        factor_recovery_per_s=settings.rate_factor_recovery_per_s,
        outputs=OutputPolicy.from_settings(settings),
    )


def breaker_policy(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        window_s=settings.breaker_window_s,
        min_calls=settings.breaker_min_calls,
        failure_ratio=settings.breaker_failure_ratio,
        open_s=settings.breaker_open_s,
        probes=settings.breaker_probes,
        consecutive_failures=settings.breaker_consecutive_failures,
    )


@lru_cache(maxsize=1)
def default_deps() -> Deps:
    """Built once per worker process: one engine, one SDK client per endpoint, shared by threads.
    The lease keeper starts here, before the first task can take a lease."""
    settings = get_settings()
    config = load_config(settings.config)
    observe.configure(settings.metrics_enabled, config)
    client = state_redis(settings)
    leases = Leases(client, settings.lease_ttl_s)
    LeaseKeeper(leases, lease_redis(settings)).start()
    # Runs hold their writes through a ledger outage: a paid call's row must not be lost. One
    # pool per process, a connection for each thread that touches the ledger. No pre-ping: it
    # was a round trip before each of a request's three transactions, and every write here goes
    # through ``transact``, which starts again on a connection found dead; the sweeps' reads that
    # meet one skip a round.
    db = settings_database(
        settings,
        hold_s=settings.ledger_hold_s,
        pool_size=settings.worker_concurrency + LEDGER_HOUSEKEEPERS,
        pre_ping=False,
    )
    return Deps(
        db=db,
        config=config,
        settings=settings,
        adapters=default_adapters(d.provider for d in config.deployments),
        bucket=Bucket(client, bucket_policy(settings), breaker=breaker_policy(settings)),
        delays=DelayQueue(broker_redis(settings)),
        leases=leases,
        fallbacks=FallbackCounter(client),
        worker=settings.worker_id or f"{socket.gethostname()}:{os.getpid()}",
        budgets=Budgets(db, client, refresh_s=settings.budget_refresh_s),
        cache=cache_deps(settings, config, client),
    )


def cache_deps(settings: Settings, config: DeploymentsConfig, state: redis.Redis) -> CacheDeps:
    """The answer cache (any request may ask for it: ``headrace_cache: on``), its flights on the
    state Redis, and the semantic search where a route has one (its model loads on first use)."""
    answers = AnswerCache(cache_client(settings, **QUICK))
    semantic = (
        SemanticCache(answers, settings, config)
        if any(r.cache == "semantic" for r in config.routes)
        else None
    )
    return CacheDeps(answers, Flights(state, longest_run_s(config, settings)), semantic)


@app.task(name=RUN_REQUEST_TASK)
def run_request_task(request_id: str) -> None:
    try:
        # Custom message headers reach the task's request: the accepting span's trace context.
        with spans.run(run_request_task.request, request_id):
            run_request(request_id, default_deps())
    finally:
        # The pool's threads live on: the next task on this thread must not log with this one's ids.
        structlog.contextvars.clear_contextvars()


_housekeepers: list[Housekeeper | DelayPublisher] = []


def housekeepers(deps: Deps) -> list[Housekeeper | DelayPublisher]:
    """The worker's periodic jobs, in three groups that never wait on each other."""
    # Locks, the delay queue and the broker's lists live on the broker's Redis; leases on the state's.
    settings, client = deps.settings, deps.delays.redis
    # Sweeps give up on a write after the default short hold: a ledger outage skips a round.
    db = deps.db.with_hold(DEFAULT_HOLD_S)
    interval = settings.sweep_interval_s
    sweeps = [
        Job(
            "publisher sweep",
            interval,
            lambda: sweep_unpublished(db, settings, client),
            keys.publisher_sweep_lock(),
        ),
        Job(
            "orphan sweep",
            interval,
            OrphanSweep(db, deps.leases, recovery_claim(deps), confirm_s=settings.lease_ttl_s / 2),
            keys.recovery_sweep_lock(),
        ),
        Job(
            "lost messages",
            settings.lost_message_check_s,
            LostMessageSweep(db, client, deps.leases, older_than_s=settings.lost_message_check_s),
            keys.lost_message_lock(),
        ),
        Job("expiry", 5.0, lambda: expire_batches(db), keys.expiry_lock()),
        Job("retention", SUGGESTED_INTERVAL_S, RetentionSweep(db, settings), keys.retention_lock()),
        # Tried twice an interval: it judges only once one is due (its cursor is in Redis).
        Job(
            "anomalies",
            settings.anomaly_interval_s / 2,
            AnomalyDetector(db, deps.leases.redis, settings),
            keys.anomaly_lock(),
        ),
    ]
    return [
        DelayPublisher(deps.delays, publish_requests),
        Housekeeper("sweeps", client, sweeps),
        Housekeeper(
            "webhooks",
            client,
            [Job("webhooks", 1.0, WebhookSender(db, settings).deliver_due, keys.webhook_lock())],
        ),
    ]


@worker_ready.connect
def _serve_metrics(**_: Any) -> None:
    settings = get_settings()
    if settings.metrics_enabled and settings.worker_metrics_port:
        metrics.serve(settings.worker_metrics_host, settings.worker_metrics_port)


@worker_ready.connect
def _start_housekeeping(**_: Any) -> None:
    for housekeeper in housekeepers(default_deps()):
        housekeeper.start()
        _housekeepers.append(housekeeper)


@worker_shutdown.connect
def _stop_housekeeping(**_: Any) -> None:
    for housekeeper in _housekeepers:
        housekeeper.stop()


@worker_init.connect
def _start_tracing(**_: Any) -> None:
    tracing.configure("headrace-worker")  # when the OTEL_* variables ask for traces


@worker_shutdown.connect
def _flush_traces(**_: Any) -> None:
    # After the pool has finished its tasks: their spans go out before the process ends.
    tracing.shutdown()
