"""The one Celery app. Its configuration is built from the settings on first use, not at import."""

from __future__ import annotations

from typing import Any

from celery import Celery, signals
from kombu.entity import Queue

from broker_config.logs import configure_logging
from broker_config.queues import ALL_QUEUES, PRIORITY_STEPS
from broker_config.redis_clients import celery_transport_options
from broker_config.settings import Settings, get_settings

app = Celery("headrace", include=["workers.tasks"])


def celery_config(settings: Settings) -> dict[str, Any]:
    visibility = settings.visibility_timeout_s
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "broker_transport_options": {
            **celery_transport_options(
                settings.redis_url,
                master_name=settings.redis_sentinel_master,
                sentinel_password=settings.redis_sentinel_password,
            ),
            "visibility_timeout": visibility,
            "priority_steps": PRIORITY_STEPS,
            "queue_order_strategy": "priority",
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
            # No retry_on_timeout: kombu then refuses to pipeline publishes (a retried pipeline could
            # publish twice), and a timed-out publish is left for the publisher sweep anyway.
            # A dead worker's unacknowledged messages come back after the visibility timeout;
            # scan for them every 10 s rather than kombu's default of every 100 s.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        "task_queues": [Queue(name) for name in ALL_QUEUES],
        "task_default_queue": "default",
        "task_default_priority": 3,
        "task_serializer": "json",
        "accept_content": ["json"],
        # Results live in the ledger; a result backend would fill the broker's Redis.
        "task_ignore_result": True,
        "task_acks_late": True,
        # A worker process lost mid-task gives its message back instead of acking it away.
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        # Not True: cancelling needs a pool that can kill a job, and the threads pool cannot; the
        # worker would shut down on every broker reconnect (terminate_job raises for that pool).
        # A task that outlives its connection is redelivered instead, and the ledger's owner
        # check turns that duplicate delivery into a no-op while the first run goes on.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_soft_shutdown_timeout": 30.0,
        "worker_enable_soft_shutdown_on_idle": True,
        # Off unless asked for: an event per task state is a pub/sub publish through a fresh kombu
        # client, 11% of a worker's CPU per request (py-spy, bench/pipeline.py). Flower turns
        # them on in every worker it sees while it runs (it broadcasts enable_events every few
        # seconds), so its task views still fill; nobody pays for them when nobody watches.
        "worker_send_task_events": settings.worker_task_events,
        # Off: a "sent" event per published task doubled the cost of accepting a batch (50,000 tasks:
        # 33 s instead of ~15 s); Flower still sees each task from the moment a worker receives it.
        "task_send_sent_event": False,
        "broker_pool_limit": 20,
    }


_explicit: list[Settings] = []


def configure(settings: Settings) -> None:
    """Point this process's app at ``settings`` (the API does, for the settings it was built with)."""
    _explicit[:] = [settings]
    if app.configured:
        app.conf.update(celery_config(settings))
        # Celery caches its broker pools; kombu keeps one per broker URL, so dropping the
        # cached references makes the next publish use the new broker's pool.
        app._pool = None
        app.amqp._producer_pool = None


@app.on_configure.connect
def _configure(sender: Celery, **_: Any) -> None:
    sender.conf.update(celery_config(_explicit[0] if _explicit else get_settings()))


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: Any) -> None:
    """Our logging instead of Celery's (which would replace the root logger's handlers and
    redirect stdout): one format for celery's records and ours (broker_config/logs.py)."""
    configure_logging(_explicit[0] if _explicit else get_settings(), level=loglevel or None)
