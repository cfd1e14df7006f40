"""Celery tasks: thin shells that hand a request id to the pipeline."""

from __future__ import annotations

import logging
import os
import socket
import threading
from functools import lru_cache
from typing import Any

import redis
from celery.signals import worker_ready, worker_shutdown
from kombu.exceptions import KombuError as BrokerError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from broker_config.celery_app import app
from broker_config.deployments import load_config
from broker_config.queues import RUN_REQUEST_TASK
from broker_config.settings import Settings, get_settings
from db.engine import get_database
from db.states import Priority
from workers import ledger
from workers.breaker import Breaker, BreakerPolicy
from workers.bucket import Bucket, BucketPolicy
from workers.delays import DelayQueue
from workers.fallbacks import FallbackCounter
from workers.housekeeping import Housekeeper
from workers.pipeline import Deps, run_request
from workers.providers import default_adapters
from workers.recovery import Heartbeats

log = logging.getLogger(__name__)
# One INFO line per provider call from the HTTP clients would drown the worker's own log.
for _noisy in ("httpx", "httpx2"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def bucket_redis(settings: Settings) -> redis.Redis:
    """The client for buckets and delays: short timeouts, a few quick retries, never a long hang."""
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=2,
        socket_connect_timeout=2,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1, base=0.05), 3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def bucket_policy(settings: Settings) -> BucketPolicy:
    return BucketPolicy(
        floors={
            Priority.INTERACTIVE: 0.0,
            Priority.DEFAULT: settings.bucket_floor_default,
            Priority.BULK: settings.bucket_floor_bulk,
        },
        # A reservation outlives any call, so that a slow call still gets its refund.
        reservation_ttl_s=settings.call_timeout_s * 2 + 60,
        factor_drop=settings.rate_factor_on_429,
        factor_min=settings.rate_factor_min,
        factor_recovery_per_s=settings.rate_factor_recovery_per_s,
    )


def breaker_policy(settings: Settings) -> BreakerPolicy:
    return BreakerPolicy(
        window_s=settings.breaker_window_s,
        min_calls=settings.breaker_min_calls,
        failure_ratio=settings.breaker_failure_ratio,
        open_s=settings.breaker_open_s,
        probes=settings.breaker_probes,
    )


@lru_cache(maxsize=1)
def default_deps() -> Deps:
    """Built once per worker process: one engine, one SDK client per endpoint, shared by threads."""
    settings = get_settings()
    client = bucket_redis(settings)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    heartbeats = Heartbeats(client, worker, settings.heartbeat_ttl_s)
    heartbeats.beat()  # alive before the first task, not only once the housekeeper starts
    return Deps(
        db=get_database(settings.database_url),
        config=load_config(settings.config),
        settings=settings,
        adapters=default_adapters(),
        bucket=Bucket(client, bucket_policy(settings)),
        delays=DelayQueue(client),
        breaker=Breaker(client, breaker_policy(settings)),
        heartbeats=heartbeats,
        fallbacks=FallbackCounter(client),
        worker=worker,
    )


class _Running:
    """Request ids this process is running: a duplicate delivery to the same process is dropped
    here, since the ledger cannot tell this process's two threads apart."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._ids:
                return False
            self._ids.add(request_id)
            return True

    def release(self, request_id: str) -> None:
        with self._lock:
            self._ids.discard(request_id)


_running = _Running()


@app.task(name=RUN_REQUEST_TASK)
def run_request_task(request_id: str) -> None:
    if not _running.claim(request_id):
        log.info("request %s is already running in this process; duplicate delivery dropped", request_id)
        return
    deps = default_deps()
    try:
        run_request(request_id, deps)
    except (redis.RedisError, BrokerError) as exc:
        # Redis went away mid-run: hand the request back to the ledger's outbox, from which the
        # publisher sweep publishes it again once Redis is back. Nothing is lost.
        log.warning("request %s returned to the outbox: Redis unreachable (%s)", request_id, exc)
        ledger.return_to_outbox(deps.db, [request_id], clean=True)
    finally:
        _running.release(request_id)


_housekeepers: list[Housekeeper] = []


@worker_ready.connect
def _start_housekeeping(**_: Any) -> None:
    deps = default_deps()
    housekeeper = Housekeeper(deps.db, deps.settings, deps.bucket.redis, deps.delays, deps.heartbeats)
    housekeeper.start()
    _housekeepers.append(housekeeper)


@worker_shutdown.connect
def _stop_housekeeping(**_: Any) -> None:
    for housekeeper in _housekeepers:
        housekeeper.stop()
