"""Single flight: identical cacheable requests in flight at once, on any workers, make one call.

The first run to ask takes the answer's flight key in the state Redis, its value the run's
request id and lease token: it leads, and makes the call. The others follow: they wait, holding no
rate-limit room, for the answer to appear in the cache, and they check that the leader is still
alive by its request lease (``workers/leases.py``), which its worker's lease keeper refreshes
while the call is under way. A leader that let go (its request failed, or it had to wait for room)
released the key; one that died stops refreshing its lease and is found dead seconds later. Either
way one follower takes the key over (a compare-and-set, ``lua/flight_claim.lua``) and makes the
call itself: no request waits on a leader that will never answer.

Every key is a single key, so the scripts run on a Redis Cluster too.
"""

from __future__ import annotations

import logging

import redis

from broker_config import keys
from broker_config.scripts import lua_source

log = logging.getLogger(__name__)


class Flights:
    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.redis = client
        self.ttl_ms = max(1000, int(ttl_s * 1000))  # a backstop: a leader holds it while it runs
        self._claim = client.register_script(lua_source("flight_claim.lua"))
        self._release = client.register_script(lua_source("flight_release.lua"))

    def holder(self, answer_key: str) -> str | None:
        """The leader of the call for ``answer_key`` ("<request id> <lease token>"), if any."""
        value = self.redis.get(keys.flight(answer_key))
        return value.decode() if isinstance(value, bytes) else value

    def alive(self, holder: str) -> bool:
        """Whether the run that leads still holds its request's lease."""
        request_id, _, token = holder.partition(" ")
        live = self.redis.get(keys.lease(request_id))
        return (live.decode() if isinstance(live, bytes) else live) == token

    def claim(self, answer_key: str, ours: str, seen: str | None) -> bool:
        """Lead the call: the key was free, or still holds ``seen`` (a leader found dead)."""
        taken = self._claim(keys=[keys.flight(answer_key)], args=[seen or "", ours, self.ttl_ms])
        return bool(taken)

    def release(self, answer_key: str, ours: str) -> None:
        """Let go of a flight this run leads. Never raises: a key left behind names a run whose
        lease is gone, which its followers find dead."""
        try:
            self._release(keys=[keys.flight(answer_key)], args=[ours])
        except redis.RedisError as exc:
            log.info("flight %s not released (%s); its followers find it dead", answer_key, exc)


def flight_value(request_id: str, lease_token: str) -> str:
    return f"{request_id} {lease_token}"
