"""Background jobs of every worker process, on one thread: the heartbeat, publishing delayed
requests when they are due, the publisher sweep, crash recovery, webhook deliveries and batch
expiry. Jobs that must not run twice at once across the pool take a Redis lock."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
from kombu.exceptions import KombuError as BrokerError
from sqlalchemy.exc import SQLAlchemyError

from broker_config import keys
from broker_config.publisher import publish_requests
from broker_config.settings import Settings
from db.engine import Database
from workers.delays import DelayQueue
from workers.expiry import expire_batches
from workers.recovery import Heartbeats, recover_orphans, requeue_lost_messages
from workers.sweeper import sweep_unpublished
from workers.webhooks import WebhookSender

log = logging.getLogger(__name__)
TICK_S = 0.25


@dataclass
class Job:
    name: str
    every_s: float
    run: Callable[[], object]
    lock: str | None = None  # a Redis key: one worker of the pool at a time
    due: float = 0.0


class Housekeeper(threading.Thread):
    def __init__(
        self,
        db: Database,
        settings: Settings,
        client: redis.Redis,
        delays: DelayQueue,
        heartbeats: Heartbeats,
    ) -> None:
        super().__init__(name="headrace-housekeeper", daemon=True)
        self.redis = client
        self.stopping = threading.Event()
        webhooks = WebhookSender(db, settings)
        self.jobs = [
            Job("heartbeat", settings.heartbeat_ttl_s / 3, heartbeats.beat),
            Job("delayed", TICK_S, lambda: delays.publish_due(publish_requests)),
            Job(
                "publisher sweep",
                settings.sweep_interval_s,
                lambda: sweep_unpublished(db, settings),
                keys.publisher_sweep_lock(),
            ),
            Job(
                "recovery sweep",
                settings.sweep_interval_s,
                lambda: recover_orphans(db, heartbeats),
                keys.recovery_sweep_lock(),
            ),
            Job("webhooks", 1.0, webhooks.deliver_due, keys.webhook_lock()),
            Job("expiry", 5.0, lambda: expire_batches(db), keys.expiry_lock()),
            Job(
                "lost messages",
                settings.lost_message_check_s,
                lambda: requeue_lost_messages(db, client, older_than_s=settings.lost_message_check_s * 2),
                keys.recovery_sweep_lock(),
            ),
        ]

    def run(self) -> None:
        while not self.stopping.wait(TICK_S):
            now = time.monotonic()
            for job in self.jobs:
                if now >= job.due:
                    job.due = now + job.every_s
                    self._run(job)

    def _run(self, job: Job) -> None:
        try:
            if job.lock is None:
                job.run()
                return
            if not self.redis.set(job.lock, "1", nx=True, px=int(max(job.every_s * 4, 30) * 1000)):
                return
            try:
                job.run()
            finally:
                self.redis.delete(job.lock)
        except (redis.RedisError, BrokerError) as exc:
            log.warning("%s skipped: Redis unreachable (%s)", job.name, exc)
        except SQLAlchemyError as exc:
            log.warning("%s skipped: database unreachable (%s)", job.name, type(exc).__name__)
        except Exception:
            log.exception("%s failed; will try again", job.name)

    def stop(self) -> None:
        self.stopping.set()
