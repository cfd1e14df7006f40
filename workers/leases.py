"""Request leases: which run owns a request, and whether that run is still alive.

A run of a request takes a lease: a random token, written into the request's ledger row (every
state change of a running request is guarded by it) and into a Redis key with a TTL of a few
seconds. The worker process's lease keeper refreshes the keys of the runs it holds, on a thread
that does nothing else. When the process dies (SIGKILL, OOM, a lost host) nothing refreshes them:
they expire seconds later and the recovery sweep requeues the requests. A restarted process with
the same host name and pid (a container's PID 1) knows none of its predecessor's tokens, so it
cannot keep them alive by mistake, as a per-process heartbeat would.

Liveness never waits on slow I/O: the keeper talks only to Redis, with short socket timeouts, and
after an error it tries again within half a second, so that leases outlive a Redis restart.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.commands.core import Script

from broker_config import keys
from broker_config.redis_clients import is_cluster
from broker_config.scripts import lua_source

log = logging.getLogger(__name__)
RETRY_AFTER_ERROR_S = 0.5


@dataclass
class Lease:
    request_id: str
    token: str
    lost: bool = False  # the keeper found another run's token in the key: stop before the next call


class Leases:
    """The leases one worker process holds; ``keeper`` refreshes them."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.redis = client
        self.ttl_ms = int(ttl_s * 1000)
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._refresh = client.register_script(lua_source("lease_refresh.lua"))
        self._release = client.register_script(lua_source("lease_release.lua"))

    def acquire(self, request_id: str) -> Lease | None:
        """A new lease on ``request_id``, or None while another run's lease on it is alive."""
        lease = Lease(request_id, secrets.token_hex(16))
        if not self.redis.set(keys.lease(request_id), lease.token, nx=True, px=self.ttl_ms):
            return None
        with self._lock:
            self._held[request_id] = lease
        return lease

    def release(self, lease: Lease) -> None:
        """Stop refreshing ``lease`` and delete its key if it is still ours. Never raises: a key
        left behind expires by itself."""
        with self._lock:
            if self._held.get(lease.request_id) is lease:
                del self._held[lease.request_id]
        # Deleted after it left the held set: a refresh under way deletes it again (``refresh``).
        try:
            self._release(keys=[keys.lease(lease.request_id)], args=[lease.token])
        except redis.RedisError as exc:
            log.info("lease of %s not released (%s); it expires by itself", lease.request_id, exc)

    def held(self) -> list[Lease]:
        with self._lock:
            return list(self._held.values())

    def refresh(self, client: redis.Redis | None = None) -> int:
        """Extend every held lease by the TTL in one round trip (a key Redis lost is written
        again); a lease whose key holds another token is marked lost. Returns how many were kept."""
        leases = self.held()
        if not leases:
            return 0
        kept = 0
        answers = self._run_each(self._refresh, leases, client, self.ttl_ms)
        for lease, ours in zip(leases, answers, strict=True):
            if ours:
                kept += 1
            elif not lease.lost:
                lease.lost = True
                log.warning("lease on request %s was taken over by another run", lease.request_id)
        # A run that released its lease while this refresh was on its way had its key written
        # back for a whole TTL, and every delivery of its request (parked, say, and published
        # again) bounced off it until it expired (seen: a request 8 s late, the last of its batch).
        released = [lease for lease in leases if not self._holds(lease)]
        if released:
            self._run_each(self._release, released, client)
        return kept

    def _run_each(
        self, script: Script, leases: list[Lease], client: redis.Redis | None, *args: int
    ) -> list[object]:
        """``script`` on each lease's key, in one pipelined round trip; one call each on a Redis
        Cluster, which refuses scripts inside a pipeline (they may reach different nodes)."""
        client = client or self.redis
        calls: list[tuple[list[str], list[str | int]]] = [
            ([keys.lease(lease.request_id)], [lease.token, *args]) for lease in leases
        ]
        if is_cluster(client):
            return [script(keys=k, args=a, client=client) for k, a in calls]
        pipe = client.pipeline(transaction=False)
        for k, a in calls:
            script(keys=k, args=a, client=pipe)
        return list(pipe.execute())

    def _holds(self, lease: Lease) -> bool:
        with self._lock:
            return self._held.get(lease.request_id) is lease

    def holders(self, request_ids: Iterable[str]) -> dict[str, str | None]:
        """The live token on each request (None: no live lease)."""
        ids = list(request_ids)
        found: dict[str, str | None] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            # GETs in a pipeline, not MGET: on a Redis Cluster the keys live in different slots.
            pipe = self.redis.pipeline(transaction=False)
            for request_id in chunk:
                pipe.get(keys.lease(request_id))
            values = pipe.execute()
            for request_id, value in zip(chunk, values, strict=True):
                found[request_id] = value.decode() if isinstance(value, bytes) else value
        return found


class LeaseKeeper(threading.Thread):
    """Refreshes a process's leases every quarter TTL, on its own Redis connection."""

    def __init__(self, leases: Leases, client: redis.Redis) -> None:
        super().__init__(name="headrace-lease-keeper", daemon=True)
        self.leases = leases
        self.client = client
        self.interval_s = leases.ttl_ms / 4000
        self.stopping = threading.Event()

    def run(self) -> None:
        wait = self.interval_s
        while not self.stopping.wait(wait):
            started = time.monotonic()
            try:
                self.leases.refresh(self.client)
                wait = max(0.0, self.interval_s - (time.monotonic() - started))
            except redis.RedisError as exc:
                log.warning("leases not refreshed: Redis unreachable (%s); trying again", exc)
                wait = RETRY_AFTER_ERROR_S

    def stop(self) -> None:
        self.stopping.set()
