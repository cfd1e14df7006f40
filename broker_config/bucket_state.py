"""Reading a deployment's bucket for people (the API and ``headrace status --deployments``).

Read-only. The level arithmetic mirrors ``workers/lua/prelude.lua`` (refill since the stored
time, capped at capacity; learned limits hold ten minutes; the rate factor recovers linearly);
it only displays, and never decides an admission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import redis

from broker_config import keys
from broker_config.deployments import Deployment

LEARNED_LIMIT_TTL_MS = 600_000


@dataclass(frozen=True)
class LimitState:
    name: str
    configured: int  # per minute, from the deployments file
    learned: int | None  # a lower limit the provider's headers told us, while it holds
    effective: float  # what the bucket enforces now: min(configured, learned) x rate factor
    level: float  # what is left to take now (negative: a debt being refilled)
    in_flight: float  # reserved by calls that have not ended yet


@dataclass(frozen=True)
class DeploymentState:
    name: str
    provider: str
    model: str
    limits: list[LimitState]
    paused_for_s: float
    rate_factor: float
    in_flight_calls: int
    grants: int
    waits: int
    too_large: int
    rate_limited: int
    follow_downs: int
    breaker: str  # closed | open | half_open
    breaker_opened: int  # times the breaker opened


def _num(raw: dict[bytes, bytes], field: str) -> float | None:
    value = raw.get(field.encode())
    return float(value) if value is not None else None


def read_state(
    client: redis.Redis, deployment: Deployment, *, recovery_per_s: float = 0.01
) -> DeploymentState:
    seconds, micros = client.time()
    now = seconds * 1000 + micros / 1000
    raw = cast(dict[bytes, bytes], client.hgetall(keys.bucket(deployment.name)))
    breaker = cast(dict[bytes, bytes], client.hgetall(keys.breaker(deployment.name)))
    # The client answers bytes (no decode_responses); redis-py's stubs allow for both.
    live = cast(list[bytes], client.zrangebyscore(keys.reservation_expiry(deployment.name), now, "+inf"))
    records = cast(list[bytes | None], client.hmget(keys.reservations(deployment.name), live) if live else [])
    in_flight: dict[str, float] = {}
    for record in records:
        if record is None:
            continue
        charges = record.decode().split("|")[1]
        for item in filter(None, charges.split(",")):
            name, _, cost = item.partition("=")
            in_flight[name] = in_flight.get(name, 0.0) + float(cost)
    factor = _num(raw, "factor")
    if factor is None:
        factor = 1.0
    else:
        factor = min(1.0, factor + (now - (_num(raw, "factor_ts") or now)) * recovery_per_s / 1000)
    since = _num(raw, "ts") or now
    limits = []
    for name, configured in deployment.limits().items():
        learned = _num(raw, f"cap:{name}")
        if learned is not None and now - (_num(raw, f"capts:{name}") or 0) >= LEARNED_LIMIT_TTL_MS:
            learned = None
        cap = min(configured, learned if learned is not None else configured) * factor
        stored = _num(raw, f"lvl:{name}")
        level = cap if stored is None else min(cap, stored + (now - since) * cap / 60000)
        limits.append(
            LimitState(
                name,
                configured,
                int(learned) if learned is not None and learned < configured else None,
                cap,
                level,
                in_flight.get(name, 0.0),
            )
        )
    counters = {k: int(_num(raw, k) or 0) for k in ("n:grant", "n:wait", "n:never", "n:429", "n:follow")}
    return DeploymentState(
        name=deployment.name,
        provider=deployment.provider,
        model=deployment.model,
        limits=limits,
        paused_for_s=max(0.0, ((_num(raw, "pause") or 0) - now) / 1000),
        rate_factor=factor,
        in_flight_calls=len([r for r in records if r is not None]),
        grants=counters["n:grant"],
        waits=counters["n:wait"],
        too_large=counters["n:never"],
        rate_limited=counters["n:429"],
        follow_downs=counters["n:follow"],
        breaker=(breaker.get(b"state") or b"closed").decode(),
        breaker_opened=int(breaker.get(b"n:opened") or 0),
    )


def delayed_requests(client: redis.Redis) -> int:
    """Requests parked until a deployment has room."""
    return int(client.zcard(keys.delayed_requests()))


def read_fallbacks(client: redis.Redis) -> dict[str, dict[str, int]]:
    """{route: {deployment: times the route's chain fell back to it}}."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.fallbacks()))
    counts: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        route, _, deployment = field.decode().partition("|")
        counts.setdefault(route, {})[deployment] = int(value)
    return counts
