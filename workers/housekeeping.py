"""The periodic jobs of every worker process, and the threads that run them.

Jobs (each safe to run twice; those that must not run on every worker at once take a Redis lock):
- (delayed requests are published when their wait is over by ``workers.delays.DelayPublisher``,
  a thread that sleeps until the next one is due);
- the publisher sweep: requests committed but never published (a crash, Redis down) are sent;
- the orphan sweep: a RUNNING request whose run's lease is gone goes back to the outbox;
- the lost-message sweep: a QUEUED request whose message is nowhere (not in the broker's lists, not
  reserved by a worker, not parked, not leased) goes back to the outbox;
- batch expiry: queued requests of a batch past its window end ``expired``;
- retention: uploaded files and results bodies past ``HEADRACE_FILE_RETENTION_DAYS`` are purged,
  cost rows kept (``db.retention``);
- anomalies: spend, tokens per request, request rate and repeated prompts per tenant and feature,
  judged against their baselines (``workers.anomalies``);
- webhook deliveries.

Each group runs on its own thread, so that slow I/O in one (a webhook receiver that hangs, a
ledger that answers slowly) never delays another; request leases are refreshed on a thread of
their own (``workers.leases``) and depend on none of these.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import redis
from kombu.exceptions import KombuError as BrokerError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from broker_config import keys
from broker_config.queues import broker_lists, broker_unacked_index_key, broker_unacked_key
from broker_config.scripts import lua_source
from broker_config.settings import Settings
from db.batch_state import OPEN_BATCH_STATUSES, end_counted_batches, end_queued_requests
from db.engine import Database
from db.models import Batch, LlmRequest
from db.outbox import being_published, publish_pending, unpublished, unpublished_batches
from db.retention import purge_expired
from db.states import RequestStatus
from db.types import utcnow
from workers import ledger, lost_calls, observe
from workers.leases import Leases

log = logging.getLogger(__name__)
TICK_S = 0.25
LOCK_MIN_S = 10.0
SWEEP_BATCH = 5000
SWEEP_BATCHES = 100  # batches looked at per round
# The lost-message sweep reads the broker's lists to prove a message is missing; past this many
# waiting messages it waits for the backlog to shrink rather than read them all.
BROKER_SCAN_LIMIT = 20_000
EXPIRED = {"kind": "expired", "message": "the batch's completion window passed before this request ran"}


@dataclass
class Job:
    name: str
    every_s: float
    run: Callable[[], object]
    lock: str | None = None  # a Redis key: one worker of the pool at a time
    due: float = 0.0


class Housekeeper(threading.Thread):
    """Runs its jobs, each every ``every_s``, on one thread; a failing job is logged and retried."""

    def __init__(self, name: str, client: redis.Redis, jobs: list[Job]) -> None:
        super().__init__(name=f"headrace-{name}", daemon=True)
        self.redis = client
        self.jobs = jobs
        self.stopping = threading.Event()
        self._release = client.register_script(lua_source("lease_release.lua"))

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
            token = secrets.token_hex(8)
            # Short: a worker killed while holding it keeps every other worker from the job until
            # it expires (a 30 s lock once delayed the requeue of a dead worker's requests by 30 s).
            # A job outliving it may run twice at once, which every job here tolerates.
            if not self.redis.set(job.lock, token, nx=True, px=int(max(job.every_s * 2, LOCK_MIN_S) * 1000)):
                return
            try:
                job.run()
            finally:
                self._release(keys=[job.lock], args=[token])
        except (redis.RedisError, BrokerError) as exc:
            log.warning("%s skipped: Redis unreachable (%s)", job.name, exc)
        except SQLAlchemyError as exc:
            log.warning("%s skipped: database unreachable (%s)", job.name, type(exc).__name__)
        except Exception:
            log.exception("%s failed; will try again", job.name)

    def stop(self) -> None:
        self.stopping.set()


def sweep_unpublished(db: Database, settings: Settings, client: redis.Redis) -> int:
    """Publish every request committed more than the grace ago and still unpublished, except
    those of a batch its publisher is still publishing (``db.outbox.publishing``)."""
    created_before = utcnow() - timedelta(seconds=settings.publish_grace_s)
    with db.session() as session:
        batches = unpublished_batches(session, created_before=created_before, limit=SWEEP_BATCHES)
    held = being_published(client, batches) if batches else set()
    total = 0
    for batch_id in (b for b in batches if b not in held):
        after = ""
        while True:
            with db.session() as session:
                pending = unpublished(
                    session, created_before=created_before, limit=SWEEP_BATCH, batch_id=batch_id, after=after
                )
            if not pending:
                break
            total += publish_pending(db, pending)
            after = pending[-1][0]
            log.info("publisher sweep: published %d request(s) that had not been", len(pending))
    return total


def running_leases(db: Database, limit: int = 5000) -> dict[str, str | None]:
    """Requests now RUNNING: id -> the lease token of the run that owns each."""
    with db.session() as session:
        rows = session.execute(
            select(LlmRequest.id, LlmRequest.lease)
            .where(LlmRequest.status == RequestStatus.RUNNING)
            .limit(limit)
        ).all()
    return {row.id: row.lease for row in rows}


def queued_published_before(db: Database, seconds_ago: float, limit: int = 1000) -> list[tuple[str, str]]:
    """QUEUED requests published longer ago than ``seconds_ago``: (id, priority)."""
    with db.session() as session:
        rows = session.execute(
            select(LlmRequest.id, LlmRequest.priority)
            .where(
                LlmRequest.status == RequestStatus.QUEUED,
                LlmRequest.published_at < utcnow() - timedelta(seconds=seconds_ago),
            )
            .limit(limit)
        ).all()
    return [(row.id, row.priority) for row in rows]


class Suspects:
    """Requests seen in a suspicious state, with when that was first seen (Redis server time). One
    sighting is not proof: a lease whose key Redis lost in a restart is written again by its keeper
    within a quarter TTL, and a message moves from the broker's list to its unacked hash in two
    steps. Kept in Redis, so that whichever worker holds the sweep's lock next goes on from the
    last sighting instead of starting over."""

    def __init__(self, client: redis.Redis, key: str, confirm_s: float) -> None:
        self.redis, self.key = client, key
        self.confirm_ms = confirm_s * 1000

    def confirmed(self, now_suspect: set[str]) -> list[str]:
        """Record this sighting; those suspect on every sighting for ``confirm_s`` at least."""
        seconds, micros = self.redis.time()
        now = seconds * 1000 + micros / 1000
        stored = cast(dict[bytes, bytes], self.redis.hgetall(self.key))
        first_seen = {item: float(stored.get(item.encode(), now)) for item in now_suspect}
        pipe = self.redis.pipeline()
        pipe.delete(self.key)
        if first_seen:
            pipe.hset(self.key, mapping=cast(dict[Any, Any], first_seen))
            pipe.pexpire(self.key, int(self.confirm_ms * 10 + 60_000))
        pipe.execute()
        return [item for item, first in first_seen.items() if now - first >= self.confirm_ms]

    def cleared(self, item: str) -> None:
        self.redis.hdel(self.key, item)


class OrphanSweep:
    """Requeue RUNNING requests whose run's lease has expired (the run died)."""

    def __init__(self, db: Database, leases: Leases, claim: lost_calls.Claim, confirm_s: float) -> None:
        self.db, self.leases, self.claim = db, leases, claim
        self.suspects = Suspects(leases.redis, keys.suspects("orphans"), confirm_s)

    def __call__(self) -> int:
        running = running_leases(self.db)
        holders = self.leases.holders(running)
        dead = {
            f"{rid}|{token or ''}"
            for rid, token in running.items()
            if token is None or holders.get(rid) != token
        }
        returned = 0
        for item in self.suspects.confirmed(dead):
            request_id, _, token = item.partition("|")
            # One request per transaction: a sweep holding several request rows could deadlock
            # with workers that lock one request and then its batch.
            if lost_calls.requeue_orphan(self.db, request_id, token or None, self.claim):
                returned += 1
            self.suspects.cleared(item)
        if returned:
            log.warning("%d running request(s) had lost their run; requeued", returned)
        return returned


class LostMessageSweep:
    """Requeue QUEUED requests whose message is nowhere a live worker will take it from: decided
    from positive evidence (not in the broker's lists, not just delivered to a worker, not parked,
    no live lease), not from empty queues. Covers messages Redis lost and messages a killed worker
    took with it."""

    def __init__(self, db: Database, client: redis.Redis, leases: Leases, older_than_s: float) -> None:
        self.db, self.redis, self.leases = db, client, leases
        self.older_than_s = older_than_s
        self.suspects = Suspects(client, keys.suspects("lost-messages"), confirm_s=older_than_s / 2)

    def __call__(self) -> int:
        candidates = queued_published_before(self.db, self.older_than_s)
        if not candidates:
            self.suspects.confirmed(set())
            return 0
        seen = self._broker_messages()
        if seen is None:
            return 0  # too long a backlog to read: wait for it to shrink
        holders = self.leases.holders(rid for rid, _ in candidates)
        pipe = self.redis.pipeline(transaction=False)
        for request_id, priority in candidates:
            pipe.zscore(keys.delayed_requests(), f"{priority}|{request_id}")
        parked = pipe.execute()
        missing = {
            request_id
            for (request_id, _), score in zip(candidates, parked, strict=True)
            if score is None and holders.get(request_id) is None and request_id.encode() not in seen
        }
        returned = 0
        for request_id in self.suspects.confirmed(missing):
            if ledger.hand_back(self.db, request_id, None, clean=True):
                returned += 1
            self.suspects.cleared(request_id)
        if returned:
            log.warning("%d queued request(s) had no message anywhere; requeued", returned)
        return returned

    def _broker_messages(self) -> bytes | None:
        """Every message the broker holds for a live worker, as one blob to search request ids in:
        waiting in its lists, or delivered within ``older_than_s``. A worker starts a message as
        soon as it is delivered (one per thread), and the run takes its lease at once; a message
        delivered longer ago to a request still QUEUED and unleased belongs to a worker that died
        with it, and kombu would give it back only after the visibility timeout (30 minutes).
        None when the lists are too long to read now."""
        lists = broker_lists()
        pipe = self.redis.pipeline(transaction=False)
        for name in lists:
            pipe.llen(name)
        if sum(pipe.execute()) > BROKER_SCAN_LIMIT:
            return None
        recent = cast(
            list[bytes],
            self.redis.zrangebyscore(broker_unacked_index_key(), time.time() - self.older_than_s, "+inf"),
        )
        pipe = self.redis.pipeline(transaction=False)
        for name in lists:
            pipe.lrange(name, 0, -1)
        if recent:
            pipe.hmget(broker_unacked_key(), recent)
        return b"\n".join(item for items in pipe.execute() for item in items if item)


def expire_batches(db: Database, limit: int = 100) -> int:
    """End the queued requests of every open batch past its window, and every open batch whose
    requests have all ended; returns how many batches. Requests already running stop before
    their next call."""
    with db.session() as session:
        due = list(
            session.scalars(
                select(Batch.id)
                .where(Batch.status.in_(OPEN_BATCH_STATUSES), Batch.expires_at <= utcnow())
                .limit(limit)
            )
        )
    for batch_id in due:

        def unit(session: Session, batch_id: str = batch_id) -> Counter[tuple[str, str]]:
            return end_queued_requests(session, batch_id, RequestStatus.EXPIRED, utcnow(), EXPIRED)

        observe.requests_ended(db.transact(unit), RequestStatus.EXPIRED.value)
    # Batches whose last ends committed side by side, each unseen by the other (db.batch_state).
    return len(due) + db.transact(end_counted_batches)


class RetentionSweep:
    """Purge what is past keeping, resuming after the batches an earlier round finished."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db, self.settings = db, settings
        self.from_id: str | None = None

    def __call__(self) -> int:
        report = purge_expired(self.db, self.settings, from_id=self.from_id)
        self.from_id = report.next_from_id or self.from_id
        return report.batches_purged + report.files_deleted
