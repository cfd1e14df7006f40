"""The shared rate-limit bucket: one per deployment (and per tenant ceiling), in Redis.

Every worker on every host takes from the same bucket with one atomic script call
(``lua/bucket_take.lua``) and settles with a second (``lua/bucket_settle.lua``) when the call
ends. The algorithm and its units are described in ``lua/prelude.lua``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

from broker_config import keys
from db.states import Priority

LUA_DIR = Path(__file__).parent / "lua"


def lua_script(name: str) -> str:
    # The prelude holds the helpers both scripts share; Redis has no script imports.
    return (LUA_DIR / "prelude.lua").read_text() + "\n" + (LUA_DIR / name).read_text()


@dataclass(frozen=True)
class Charge:
    """One limit a call counts against: its per-minute size and what this call takes from it."""

    name: str
    limit: int
    cost: float


@dataclass(frozen=True)
class Admission:
    status: Literal["granted", "wait", "never"]
    wait_s: float = 0.0
    reason: str = ""  # which limit made it wait, or is too small
    limit: int = 0  # for "never": the limit the cost exceeds


@dataclass(frozen=True)
class Observed:
    """What the provider's headers said of one limit (None: not said)."""

    limit: int | None = None
    remaining: int | None = None


@dataclass(frozen=True)
class Settlement:
    """How a call ended, for the bucket.

    ``used``: per limit, what the call really counted (None keeps the reservation as charged,
    when we cannot know, e.g. after a timeout). ``tenant_used`` likewise for the tenant's ceiling.
    """

    used: Mapping[str, float | None]
    tenant_used: Mapping[str, float | None] = field(default_factory=dict)
    observed: Mapping[str, Observed] = field(default_factory=dict)
    rate_limited: bool = False
    pause_s: float = 0.0


@dataclass(frozen=True)
class BucketPolicy:
    # Share of each limit a priority must leave unused, so that a waiting bulk request never
    # stands between an interactive one and the tokens it needs.
    floors: Mapping[str, float] = field(
        default_factory=lambda: {Priority.INTERACTIVE: 0.0, Priority.DEFAULT: 0.05, Priority.BULK: 0.10}
    )
    reservation_ttl_s: float = 600.0
    factor_drop: float = 0.7  # on a 429 the rate is multiplied by this...
    factor_min: float = 0.2
    factor_recovery_per_s: float = 0.01  # ...and recovers by this much per second
    follow_tolerance: float = 0.02  # follow the provider down when it is lower by more than this


class Bucket:
    """Takes and settles reservations; ``clock_ms`` exists only for the property tests."""

    def __init__(
        self,
        client: redis.Redis,
        policy: BucketPolicy | None = None,
        clock_ms: Callable[[], float] | None = None,
    ) -> None:
        self.redis = client
        self.policy = policy or BucketPolicy()
        self._clock_ms = clock_ms
        self._take = client.register_script(lua_script("bucket_take.lua"))
        self._settle = client.register_script(lua_script("bucket_settle.lua"))

    def _keys(self, deployment: str, tenant: str | None) -> list[str]:
        return [
            keys.bucket(deployment),
            keys.reservations(deployment),
            keys.reservation_expiry(deployment),
            keys.tenant_bucket(deployment, tenant or "-"),
        ]

    def _clock(self) -> str:
        return "" if self._clock_ms is None else repr(self._clock_ms())

    def take(
        self,
        deployment: str,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        priority: str,
        tenant: str | None = None,
        tenant_charges: Sequence[Charge] = (),
    ) -> Admission:
        """Take every charge at once, or nothing. One round trip."""
        policy = self.policy
        args: list[str | float | int] = [
            self._clock(),
            reservation_id,
            policy.floors.get(priority, 0.0),
            int(policy.reservation_ttl_s * 1000),
            policy.factor_recovery_per_s / 1000,
            len(charges),
        ]
        for charge in charges:
            args += [charge.name, charge.limit, charge.cost]
        args.append(len(tenant_charges))
        for charge in tenant_charges:
            args += [charge.name, charge.limit, charge.cost]
        status, amount, reason = self._take(keys=self._keys(deployment, tenant), args=args)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if status == 1:
            return Admission("granted")
        if status == 0:
            return Admission("wait", wait_s=int(amount) / 1000, reason=reason)
        return Admission("never", reason=reason, limit=int(amount))

    def settle(
        self,
        deployment: str,
        reservation_id: str,
        charges: Sequence[Charge],
        settlement: Settlement,
        *,
        tenant: str | None = None,
        tenant_charges: Sequence[Charge] = (),
    ) -> bool:
        """Give back (or take) the difference between reserved and used; learn from headers."""
        policy = self.policy
        args: list[str | float | int] = [
            self._clock(),
            reservation_id,
            policy.factor_recovery_per_s / 1000,
            int(settlement.pause_s * 1000),
            1 if settlement.rate_limited else 0,
            policy.factor_drop,
            policy.factor_min,
            policy.follow_tolerance,
            len(charges),
        ]
        for charge in charges:
            used = settlement.used.get(charge.name)
            seen = settlement.observed.get(charge.name, Observed())
            args += [
                charge.name,
                charge.limit,
                -1 if used is None else used,
                -1 if seen.limit is None else seen.limit,
                -1 if seen.remaining is None else seen.remaining,
            ]
        args.append(len(tenant_charges))
        for charge in tenant_charges:
            used = settlement.tenant_used.get(charge.name)
            args += [charge.name, charge.limit, -1 if used is None else used]
        found = self._settle(keys=self._keys(deployment, tenant), args=args)
        return bool(found)
