"""Finding work a crash left behind, so that no request waits for the broker's visibility timeout.

- Heartbeats: every worker process keeps a short-lived key alive while it runs.
- Orphans: a request RUNNING under an owner whose heartbeat stopped goes back to the outbox, and
  the publisher sweep sends it again; its in-flight attempt is then costed as an estimate.
- Lost messages: when the broker's queues are empty yet requests are QUEUED, published long ago
  and not waiting in the delay queue, their messages were lost (a Redis restart without its
  append-only file): they go back to the outbox too. Redeliveries are harmless: a request that
  ended, or runs under a live owner, is left alone.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from sqlalchemy import select

from broker_config import keys
from broker_config.queues import broker_lists
from db.engine import Database
from db.models import LlmRequest
from db.states import RequestStatus
from db.types import utcnow
from workers import ledger

log = logging.getLogger(__name__)


class Heartbeats:
    def __init__(self, client: redis.Redis, worker: str, ttl_s: float) -> None:
        self.redis = client
        self.worker = worker
        self.ttl_ms = int(ttl_s * 1000)

    def beat(self) -> None:
        self.redis.set(keys.worker_heartbeat(self.worker), "1", px=self.ttl_ms)

    def alive(self, worker: str) -> bool:
        return bool(self.redis.exists(keys.worker_heartbeat(worker)))


def recover_orphans(db: Database, heartbeats: Heartbeats) -> int:
    """Requeue the RUNNING requests of workers whose heartbeat has stopped."""
    returned = 0
    for owner, request_ids in ledger.running_owners(db).items():
        if owner and heartbeats.alive(owner):
            continue
        count = ledger.return_to_outbox(db, request_ids, clean=False, owner=owner or None)
        if count:
            log.warning("worker %s is gone: %d running request(s) requeued", owner or "(unknown)", count)
        returned += count
    return returned


def requeue_lost_messages(
    db: Database, client: redis.Redis, *, older_than_s: float, limit: int = 1000
) -> int:
    """Requeue QUEUED requests whose message the broker no longer has."""
    if any(client.llen(name) for name in broker_lists()):
        return 0  # work is still queued: these requests may simply be waiting their turn
    with db.session() as session:
        rows = session.execute(
            select(LlmRequest.id, LlmRequest.priority)
            .where(
                LlmRequest.status == RequestStatus.QUEUED,
                LlmRequest.published_at < utcnow() - timedelta(seconds=older_than_s),
            )
            .limit(limit)
        ).all()
    parked = {
        row.id
        for row in rows
        if client.zscore(keys.delayed_requests(), f"{row.priority}|{row.id}") is not None
    }
    lost = [row.id for row in rows if row.id not in parked]
    if not lost:
        return 0
    count = ledger.return_to_outbox(db, lost, clean=True)
    log.warning("%d queued request(s) had no message in the broker; requeued", count)
    return count
