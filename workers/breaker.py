"""Circuit breakers, one per deployment, and fallback counts, one per route: both shared by
every worker through Redis, both written after a routing decision, best-effort.

A deployment whose calls fail too often (server errors, timeouts, cut connections: the provider's
health, not the request's fault nor a rate limit) is opened: requests go straight to the next
deployment of their chain instead of spending attempts on it. After ``open_s`` a few probe calls
are let through (half-open); when they succeed it closes, when as many fail it opens again. The state
machine lives in ``lua/breaker.lua``. A worker asks it inside the bucket's take and tells it inside
the settlement (``workers/admission.py``: one round trip each); ``Breaker`` asks and tells it on its
own (``lua/breaker_allow.lua``, ``lua/breaker_record.lua``), for tests and tools.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis

from broker_config import keys
from broker_config.scripts import BREAKER, lua_source
from workers import observe
from workers.providers.base import CallFailed, ProviderReply

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BreakerPolicy:
    window_s: float = 30.0
    min_calls: int = 10  # no verdict on fewer calls than this in the window
    failure_ratio: float = 0.5
    # Short and constant: a probe of a provider that refuses before any work costs nothing, and the
    # end of an outage waits for the next probe. 15 s kept a 10 s outage's end waiting 8 s more;
    # 5 s still lost a 10-second window when a probe fell just before the end (bench/rate_limits.py
    # --faults --timeline). Two probes per 2 s is one call a second while a deployment is down.
    open_s: float = 2.0
    probes: int = 2  # successes needed (and probes allowed at once) to close
    # Failures in a row that open it at once (0: only the ratio): the window's successes from
    # before a sudden outage would otherwise keep it closed until as many calls had failed. Ten:
    # a provider failing one call in five at random shows ten in a row about once in ten million.
    consecutive_failures: int = 10

    def count_args(self, call: BreakerCall) -> list[str | float | int]:
        """What ``breaker_count_from`` in ``lua/breaker.lua`` reads for one call, in its order."""
        return [
            call.call_id,
            1 if call.failed else 0,
            int(self.window_s * 1000),
            self.min_calls,
            self.failure_ratio,
            self.probes,
            1 if call.probe else 0,
            self.consecutive_failures,
        ]


@dataclass(frozen=True)
class BreakerCall:
    """One call as the breaker counts it."""

    call_id: str
    failed: bool  # the deployment's health failed it (``is_provider_failure``)
    probe: bool  # it went as a half-open probe


def count_keys(deployment: str) -> list[str]:
    """The keys a count touches, in the order ``lua/breaker.lua`` takes them."""
    return [keys.breaker(deployment), keys.breaker_calls(deployment), keys.breaker_failures(deployment)]


def log_transition(deployment: str, transition: str, policy: BreakerPolicy, *, probe: bool) -> None:
    """Tell the log and the metrics of a change the breaker's script made (one process sees each)."""
    if transition:
        observe.breaker_changed(deployment, transition)
    if transition == "opened":
        why = (
            "a probe" if probe else f"{policy.consecutive_failures} in a row or >= {policy.failure_ratio:.0%}"
        )
        log.warning(
            "circuit breaker OPENED for deployment %s: %s of its calls failed; skipped for %.0fs",
            deployment,
            why,
            policy.open_s,
        )
    elif transition == "closed":
        log.warning("circuit breaker CLOSED for deployment %s: its probes succeeded", deployment)


@dataclass(frozen=True)
class Permit:
    allowed: bool
    wait_s: float = 0.0
    probe: bool = False


def is_provider_failure(outcome: ProviderReply | CallFailed) -> bool:
    """Failures that say the deployment is unhealthy: 5xx (529 included), timeouts, cut or
    refused connections, unreadable replies. A 4xx is the request's fault; a 429 is the bucket's."""
    if isinstance(outcome, ProviderReply):
        return False
    if outcome.kind in ("timeout", "connection", "invalid_reply"):
        return True
    return outcome.kind == "status" and (outcome.status or 0) >= 500


class Breaker:
    def __init__(
        self,
        client: redis.Redis,
        policy: BreakerPolicy | None = None,
        clock_ms: Callable[[], float] | None = None,
    ) -> None:
        self.redis = client
        self.policy = policy or BreakerPolicy()
        self._clock_ms = clock_ms
        self._allow = client.register_script(lua_source("breaker_allow.lua", BREAKER))
        self._record = client.register_script(lua_source("breaker_record.lua", BREAKER))

    def _clock(self) -> str:
        return "" if self._clock_ms is None else repr(self._clock_ms())

    def allow(self, deployment: str) -> Permit:
        policy = self.policy
        allowed, wait_ms, state = self._allow(
            keys=[keys.breaker(deployment)], args=[self._clock(), int(policy.open_s * 1000), policy.probes]
        )
        state = state.decode() if isinstance(state, bytes) else str(state)
        return Permit(bool(allowed), int(wait_ms) / 1000, probe=bool(allowed) and state == "half_open")

    def record(self, deployment: str, call_id: str, *, failed: bool, probe: bool) -> str:
        """Count one call; returns the transition it caused ('opened', 'closed' or '')."""
        policy = self.policy
        transition = self._record(
            keys=count_keys(deployment),
            args=[self._clock(), *policy.count_args(BreakerCall(call_id, failed=failed, probe=probe))],
        )
        transition = transition.decode() if isinstance(transition, bytes) else str(transition)
        log_transition(deployment, transition, policy, probe=probe)
        return transition


class FallbackCounter:
    """How often each route had to fall back to each deployment of its chain."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def activated(self, route: str, deployment: str) -> None:
        """The chain of ``route`` moved on to ``deployment`` (not its first) for one request."""
        self.redis.hincrby(keys.fallbacks(), f"{route}|{deployment}", 1)
