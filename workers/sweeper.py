"""The publisher sweep: publishes requests that were committed but never published.

It runs in a thread of every worker process; a Redis lock lets one of them sweep at a time.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

import redis
from kombu.exceptions import OperationalError as BrokerError

from broker_config.settings import Settings
from db.engine import Database
from db.outbox import publish_pending, unpublished
from db.types import utcnow
from workers.keys import publisher_sweep_lock

log = logging.getLogger(__name__)
SWEEP_BATCH = 5000


def sweep_unpublished(db: Database, settings: Settings) -> int:
    """Publish every request committed more than the grace ago and still unpublished."""
    total = 0
    while True:
        with db.session() as session:
            pending = unpublished(
                session,
                created_before=utcnow() - timedelta(seconds=settings.publish_grace_s),
                limit=SWEEP_BATCH,
            )
        if not pending:
            return total
        total += publish_pending(db, pending)
        log.info("publisher sweep: published %d request(s) that had not been", len(pending))


class PublisherSweep(threading.Thread):
    def __init__(self, db: Database, settings: Settings) -> None:
        super().__init__(name="headrace-publisher-sweep", daemon=True)
        self.db = db
        self.settings = settings
        self.stopping = threading.Event()
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)

    def run(self) -> None:
        lock_ms = int(max(self.settings.sweep_interval_s * 4, 30) * 1000)
        while not self.stopping.wait(self.settings.sweep_interval_s):
            try:
                if self.redis.set(publisher_sweep_lock(), "1", nx=True, px=lock_ms):
                    try:
                        sweep_unpublished(self.db, self.settings)
                    finally:
                        self.redis.delete(publisher_sweep_lock())
            except (redis.RedisError, BrokerError) as exc:
                log.warning("publisher sweep skipped: broker unreachable (%s)", exc)
            except Exception:
                log.exception("publisher sweep failed; will try again")

    def stop(self) -> None:
        self.stopping.set()
