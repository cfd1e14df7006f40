"""Reading a deployment's bucket for people (the API and ``headrace status --deployments``).

Read-only. The levels are computed by ``workers/lua/bucket_read.lua`` with the same prelude
functions (capacity, level, rate_factor, the monotonic clock) that ``bucket_take.lua`` decides
admission with: what is shown is what is enforced, and there is no second copy of the arithmetic
to drift from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import redis

from broker_config import keys
from broker_config.deployments import Deployment
from broker_config.scripts import PRELUDE, lua_source


@dataclass(frozen=True)
class LimitState:
    name: str
    configured: int  # per minute, from the deployments file
    learned: int | None  # a lower limit the provider's headers told us, while it holds
    effective: float  # what the bucket enforces now: min(configured, learned) x rate factor
    level: float  # what is left to take now (negative: a debt being refilled)
    in_flight: float  # reserved by calls that have not ended yet
    # "steps" when the provider's headers last said this room comes back at moments (a window),
    # "continuous" when they read as a token bucket's (or said nothing of it).
    shape: str = "continuous"
    room_back_in_s: float = 0.0  # until the room the last such forecast held back comes back


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
    # How far Redis's clock is behind the bucket's last stamp (it stepped back, e.g. a failover
    # to a replica whose clock is behind): refill stalls until it catches up. 0 normally.
    clock_behind_s: float = 0.0


def read_state(
    client: redis.Redis,
    deployment: Deployment,
    *,
    recovery_per_s: float = 0.01,
    clock_ms: Callable[[], float] | None = None,
) -> DeploymentState:
    """One deployment's bucket and breaker; ``clock_ms`` exists only for tests (as Bucket's)."""
    limits = deployment.limits()
    args: list[str | float | int] = ["" if clock_ms is None else repr(clock_ms()), recovery_per_s / 1000]
    args.append(len(limits))
    for name, configured in limits.items():
        args += [name, configured]
    script = client.register_script(lua_source("bucket_read.lua", PRELUDE))
    bucket_keys = [
        keys.bucket(deployment.name),
        keys.reservations(deployment.name),
        keys.reservation_expiry(deployment.name),
    ]
    # The client answers bytes (no decode_responses); redis-py's stubs allow for both.
    reply = [v.decode() if isinstance(v, bytes) else str(v) for v in script(keys=bucket_keys, args=args)]
    factor, paused_ms, calls, behind_ms, grants, waits, never, limited, follows = reply[:9]
    states = []
    for i, (name, configured) in enumerate(limits.items()):
        _, effective, level, learned, held, shape, back_ms = reply[9 + 7 * i : 16 + 7 * i]
        states.append(
            LimitState(
                name,
                configured,
                int(float(learned)) if learned else None,
                float(effective),
                float(level),
                float(held),
                shape,
                float(back_ms) / 1000,
            )
        )
    breaker = cast(dict[bytes, bytes], client.hgetall(keys.breaker(deployment.name)))
    return DeploymentState(
        name=deployment.name,
        provider=deployment.provider,
        model=deployment.model,
        limits=states,
        paused_for_s=float(paused_ms) / 1000,
        rate_factor=float(factor),
        in_flight_calls=int(calls),
        grants=int(grants),
        waits=int(waits),
        too_large=int(never),
        rate_limited=int(limited),
        follow_downs=int(follows),
        breaker=(breaker.get(b"state") or b"closed").decode(),
        breaker_opened=int(breaker.get(b"n:opened") or 0),
        clock_behind_s=float(behind_ms) / 1000,
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
