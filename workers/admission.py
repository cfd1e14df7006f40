"""Rate-limit admission, top to bottom: how big a call is, what it takes from each limit, taking
that from the shared bucket in one atomic step (or waiting, or never), and settling it once the
call has ended.

    estimate_call(deployment, body)            estimated prompt + output cap x n
    admit(bucket, deployment, estimate, ...)   Bucket.take -> lua/bucket_take.lua, all or nothing
        -> Ticket | Wait (how long, and why) | TooLarge (can never fit there)
    ... the provider call ...
    settlement(deployment, estimate, outcome)  what the call really counted, limit by limit, and
                                               what the provider's headers forecast (forecast.py)
    settle(bucket, ticket, settlement, call)   Bucket.settle -> lua/bucket_settle.lua; never raises

The deployment's circuit breaker (``workers/breaker.py``, ``lua/breaker.lua``) is asked in the
take and told how the call went in the settlement, in the same atomic step and round trip: a
deployment it keeps shut takes no room, and a half-open probe's place is taken only with room.

One bucket per deployment (and per tenant ceiling) in Redis, shared by every worker on every
host. The algorithm, its units and its clock are in ``lua/prelude.lua``. What people see
(``GET /v1/deployments``) is read by ``lua/bucket_read.lua`` with that same prelude
(``broker_config/bucket_state.py``). How each provider counts (which tokens count against which
limit, the offline prompt estimate, what a call that ended counted) is ``workers/metering.py``,
and how its headers read as a forecast ``workers/forecast.py``, kept apart only so that this
module stays one readable page.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import redis

from broker_config import keys
from broker_config.deployments import Deployment, TenantLimits
from broker_config.scripts import BREAKER, lua_source
from db.states import Priority
from workers.breaker import BreakerCall, BreakerPolicy, count_keys, log_transition
from workers.forecast import Forecast
from workers.metering import (
    DEFAULT_PAUSE_S,
    MAX_PAUSE_S,
    Settlement,
    by_limit,
    estimate_prompt_tokens,
    settlement_of,
)
from workers.providers.base import CallFailed, ProviderReply, requested_max_tokens

__all__ = [
    "DEFAULT_PAUSE_S",
    "MAX_PAUSE_S",
    "Admission",
    "Bucket",
    "BucketPolicy",
    "Charge",
    "Estimate",
    "Forecast",
    "Settled",
    "Settlement",
    "Ticket",
    "TooLarge",
    "Wait",
    "admission_charges",
    "admit",
    "estimate_call",
    "estimate_prompt_tokens",
    "requested_max_tokens",
    "settle",
    "settlement",
    "tenant_charges",
]

log = logging.getLogger(__name__)

# --- 1. How big the call is ------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A call's size before it is made: estimated prompt tokens, and the output it may produce."""

    prompt_tokens: int
    output_tokens: int  # max_tokens x n: what the provider reserves


def estimate_call(deployment: Deployment, body: Mapping[str, Any], default_max_tokens: int) -> Estimate:
    """The output cap is the one the adapters send: the body's own, else the deployment's
    ``max_output_tokens``, else ``default_max_tokens`` (``ProviderCall.default_max_tokens``)."""
    n = body.get("n")
    completions = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    max_tokens = requested_max_tokens(body, deployment.max_output_tokens or default_max_tokens)
    return Estimate(estimate_prompt_tokens(body), max_tokens * completions)


@dataclass(frozen=True)
class Charge:
    """One limit a call counts against: its per-minute size and what this call takes from it."""

    name: str
    limit: int
    cost: float


def admission_charges(deployment: Deployment, estimate: Estimate) -> list[Charge]:
    """What the call takes from each of the deployment's limits, before it is made."""
    costs = by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    return [Charge(name, limit, costs[name] or 0.0) for name, limit in deployment.limits().items()]


def tenant_charges(tenant: TenantLimits | None, estimate: Estimate) -> list[Charge]:
    """The same call against a tenant's own ceiling: requests, and all its tokens together."""
    if tenant is None:
        return []
    costs = by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    return [Charge(name, limit, costs[name] or 0.0) for name, limit in tenant.limits().items()]


# --- 2. The shared bucket ----------------------------------------------------------------------


@dataclass(frozen=True)
class BucketPolicy:
    # Share of each limit a priority must leave unused, so that a waiting bulk request never
    # stands between an interactive one and the tokens it needs.
    floors: Mapping[str, float] = field(
        default_factory=lambda: {Priority.INTERACTIVE: 0.0, Priority.DEFAULT: 0.05, Priority.BULK: 0.10}
    )
    # Timeouts of deployments that set none (settings.call_timeout_s, connect_timeout_s).
    call_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    # Time around the call that its reservation must also outlive: the attempt's ledger rows,
    # the settlement's round trip, a slow Redis.
    reservation_margin_s: float = 60.0
    factor_drop: float = 0.7  # on a 429 the rate is multiplied by this...
    factor_min: float = 0.2
    factor_recovery_per_s: float = 0.01  # ...and recovers by this much per second
    follow_tolerance: float = 0.02  # follow the provider down when it is lower by more than this
    # On a limiter whose room comes back at a moment (a window), the floors are lent out this
    # long before it: a request above waits at most this long, and the window's room is used.
    floor_lift_s: float = 2.0
    # On a continuous limit a floor is lent out while no priority above it has asked for this
    # long: a bulk batch alone gets the whole limit, and the first interactive request after it
    # waits only for the refill of its own cost (the floor is back as soon as it asks).
    floor_idle_s: float = 30.0
    # A new bucket starts its refill this much after its first take: the provider's starts when
    # that call reaches it (client set-up, connection), and ours must not run ahead of it.
    first_call_s: float = 0.25

    def reservation_ttl_s(self, deployment: Deployment) -> float:
        """How long a reservation on ``deployment`` lives unsettled. It must outlive the call: an
        expired one is settled as nothing (no refund, and an under-estimate is never charged)."""
        read_s = deployment.timeout_s or self.call_timeout_s
        connect_s = deployment.connect_timeout_s or self.connect_timeout_s
        return read_s + connect_s + self.reservation_margin_s


@dataclass(frozen=True)
class Admission:
    """The bucket's answer to one take."""

    status: Literal["granted", "wait", "never", "open"]  # open: the breaker keeps it shut
    wait_s: float = 0.0
    reason: str = ""  # which limit made it wait, or is too small
    limit: int = 0  # for "never": the limit the cost exceeds
    probe: bool = False  # granted as the half-open breaker's probe


@dataclass(frozen=True)
class Settled:
    """The bucket's answer to one settlement."""

    found: bool  # the reservation was still there to settle
    transition: str = ""  # what the call did to the breaker: "opened", "closed" or ""


class Bucket:
    """Takes and settles reservations; ``clock_ms`` exists only for the property tests. With a
    ``breaker`` policy every take first asks the deployment's breaker, and a settlement given the
    call's ``BreakerCall`` counts it there (the worker's way); without one the breaker is left out."""

    def __init__(
        self,
        client: redis.Redis,
        policy: BucketPolicy | None = None,
        clock_ms: Callable[[], float] | None = None,
        *,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        self.redis = client
        self.policy = policy or BucketPolicy()
        self.breaker = breaker
        self._clock_ms = clock_ms
        self._take = client.register_script(lua_source("bucket_take.lua", BREAKER))
        self._settle = client.register_script(lua_source("bucket_settle.lua", BREAKER))

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
        ttl_s: float,
        tenant: str | None = None,
        tenant_charges: Sequence[Charge] = (),
    ) -> Admission:
        """Take every charge at once, or nothing. One round trip."""
        policy = self.policy
        floor = policy.floors.get(priority, 0.0)
        args: list[str | float | int] = [
            self._clock(),
            reservation_id,
            repr(floor),
            int(ttl_s * 1000),
            policy.factor_recovery_per_s / 1000,
            int(policy.floor_lift_s * 1000),
            int(policy.first_call_s * 1000),
            int(policy.floor_idle_s * 1000),
            ",".join(repr(other) for other in sorted(set(policy.floors.values())) if other < floor),
            len(charges),
        ]
        for charge in charges:
            args += [charge.name, charge.limit, charge.cost]
        args.append(len(tenant_charges))
        for charge in tenant_charges:
            args += [charge.name, charge.limit, charge.cost]
        script_keys = self._keys(deployment, tenant)
        if self.breaker is not None:
            script_keys.append(keys.breaker(deployment))
            args += [int(self.breaker.open_s * 1000), self.breaker.probes]
        status, amount, reason = self._take(keys=script_keys, args=args)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if status == 1:
            return Admission("granted", probe=reason == "probe")
        if status == 0:
            return Admission("wait", wait_s=int(amount) / 1000, reason=reason)
        if status == 2:
            return Admission("open", wait_s=int(amount) / 1000, reason="circuit_open")
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
        call: BreakerCall | None = None,
    ) -> Settled:
        """Give back (or take) the difference between reserved and used; learn from headers; with
        a breaker policy and the ``call``, count it in the deployment's breaker."""
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
            max(0, round(settlement.age_s * 1000)),
            len(charges),
        ]
        for charge in charges:
            used = settlement.used.get(charge.name)
            seen = settlement.observed.get(charge.name, Forecast())
            reset_ms = None if seen.reset_s is None else round(seen.reset_s * 1000)
            said = (seen.limit, seen.remaining, reset_ms)
            args += [charge.name, charge.limit, -1 if used is None else used]
            args += [-1 if value is None else value for value in said]
        args.append(len(tenant_charges))
        for charge in tenant_charges:
            used = settlement.tenant_used.get(charge.name)
            args += [charge.name, charge.limit, -1 if used is None else used]
        script_keys = self._keys(deployment, tenant)
        if self.breaker is not None and call is not None:
            script_keys += count_keys(deployment)
            args += self.breaker.count_args(call)
        found, transition = self._settle(keys=script_keys, args=args)
        transition = transition.decode() if isinstance(transition, bytes) else str(transition)
        if transition and call is not None:
            log_transition(deployment, transition, self.breaker or BreakerPolicy(), probe=call.probe)
        return Settled(bool(found), transition)


# --- 3. Before the call: admit -------------------------------------------------------------------


@dataclass(frozen=True)
class Ticket:
    """Room reserved for one call; settle it when the call ends."""

    deployment: Deployment
    reservation_id: str
    charges: list[Charge]
    tenant: str | None
    tenant_charges: list[Charge]
    probe: bool = False  # the half-open breaker's probe: its outcome decides whether it closes


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class TooLarge:
    message: str


def admit(
    bucket: Bucket,
    deployment: Deployment,
    estimate: Estimate,
    *,
    request_id: str,
    priority: str,
    tenant: TenantLimits | None,
    max_inline_wait_s: float,
    sleep: Callable[[float], None],
) -> Ticket | Wait | TooLarge:
    """Reserve room for one call. Short waits are spent in place (the slot stays busy for at most
    ``2 x max_inline_wait_s``); a longer one is handed back, and the pipeline tries the next
    deployment of the chain or parks the request in the delay queue."""
    charges = admission_charges(deployment, estimate)
    ceiling = tenant_charges(tenant, estimate)
    tenant_name = tenant.name if tenant else None
    ttl_s = bucket.policy.reservation_ttl_s(deployment)
    waited = 0.0
    while True:
        reservation_id = f"{request_id}:{uuid.uuid4().hex[:10]}"
        admission = bucket.take(
            deployment.name,
            reservation_id,
            charges,
            priority=priority,
            ttl_s=ttl_s,
            tenant=tenant_name,
            tenant_charges=ceiling,
        )
        if admission.status == "granted":
            return Ticket(deployment, reservation_id, charges, tenant_name, ceiling, probe=admission.probe)
        if admission.status == "open":  # not worth waiting for in place: the chain goes on
            return Wait(admission.wait_s, admission.reason)
        if admission.status == "never":
            on_tenant = admission.reason.startswith("tenant:")
            limit_name = admission.reason.removeprefix("tenant:")
            cost = next(c.cost for c in (ceiling if on_tenant else charges) if c.name == limit_name)
            whose = "tenant ceiling" if on_tenant else "limit"
            return TooLarge(
                f"the request needs {cost:.0f} {limit_name} but the {whose} of deployment "
                f"{deployment.name!r} is {admission.limit} per minute: it can never fit there"
            )
        if admission.wait_s > max_inline_wait_s or waited + admission.wait_s > 2 * max_inline_wait_s:
            return Wait(admission.wait_s, admission.reason)
        # Jitter, so that workers woken for the same refill do not all ask at the same instant.
        pause = admission.wait_s * random.uniform(1.0, 1.25)
        sleep(pause)
        waited += pause


# --- 4. After the call: settle -------------------------------------------------------------------


def settlement(
    deployment: Deployment, estimate: Estimate, outcome: ProviderReply | CallFailed, *, age_s: float = 0.0
) -> Settlement:
    """What the call really counted, limit by limit, from how it ended (``metering.py``);
    ``age_s``: how long ago the provider answered."""
    return replace(settlement_of(deployment, estimate.prompt_tokens, outcome), age_s=age_s)


def settle(
    bucket: Bucket, ticket: Ticket, settlement: Settlement, *, call_id: str = "", failed: bool | None = None
) -> Settled:
    """Never raises: a paid call's ledger row must not depend on the bucket. A bucket we cannot
    reach only loses the refund (it over-throttles until the reservation expires). ``failed``:
    whether the call says the deployment is unhealthy (None: no call was made, the breaker is not
    told)."""
    call = None if failed is None else BreakerCall(call_id, failed=failed, probe=ticket.probe)
    try:
        return bucket.settle(
            ticket.deployment.name,
            ticket.reservation_id,
            ticket.charges,
            settlement,
            tenant=ticket.tenant,
            tenant_charges=ticket.tenant_charges,
            call=call,
        )
    except redis.RedisError as exc:
        log.warning("could not settle reservation %s (%s); it expires on its own", ticket.reservation_id, exc)
    except Exception:  # a bug here must not lose the attempt's row either
        log.exception("settling reservation %s failed", ticket.reservation_id)
    return Settled(False)
