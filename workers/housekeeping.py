"""Background jobs of every worker process: publishing delayed requests when they are due, and
the publisher sweep (one worker at a time, under a Redis lock)."""

from __future__ import annotations

import logging
import threading

import redis
from kombu.exceptions import OperationalError as BrokerError

from broker_config.keys import publisher_sweep_lock
from broker_config.publisher import publish_requests
from broker_config.settings import Settings
from db.engine import Database
from workers.delays import DelayQueue
from workers.sweeper import sweep_unpublished

log = logging.getLogger(__name__)
DELAYED_POLL_S = 0.25


class Housekeeper(threading.Thread):
    def __init__(self, db: Database, settings: Settings, client: redis.Redis, delays: DelayQueue) -> None:
        super().__init__(name="headrace-housekeeper", daemon=True)
        self.db = db
        self.settings = settings
        self.redis = client
        self.delays = delays
        self.stopping = threading.Event()
        self._next_sweep = 0.0

    def run(self) -> None:
        elapsed = 0.0
        while not self.stopping.wait(DELAYED_POLL_S):
            elapsed += DELAYED_POLL_S
            try:
                while self.delays.publish_due(publish_requests):
                    pass
                if elapsed >= self.settings.sweep_interval_s:
                    elapsed = 0.0
                    self._sweep()
            except (redis.RedisError, BrokerError) as exc:
                log.warning("housekeeping skipped: broker unreachable (%s)", exc)
            except Exception:
                log.exception("housekeeping failed; will try again")

    def _sweep(self) -> None:
        lock_ms = int(max(self.settings.sweep_interval_s * 4, 30) * 1000)
        if self.redis.set(publisher_sweep_lock(), "1", nx=True, px=lock_ms):
            try:
                sweep_unpublished(self.db, self.settings)
            finally:
                self.redis.delete(publisher_sweep_lock())

    def stop(self) -> None:
        self.stopping.set()
