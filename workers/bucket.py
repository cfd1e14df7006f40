"""The shared bucket's Python side: what one take and one settlement send to its Lua scripts
(``lua/bucket_take.lua``, ``lua/bucket_settle.lua``, the algorithm in ``lua/prelude.lua``) and what
they answer. How a call is sized, admitted and settled reads in ``workers/admission.py``; this is
kept apart only so that that module stays one readable page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import redis

from broker_config import keys
from broker_config.deployments import Deployment
from broker_config.redis_clients import is_cluster
from broker_config.scripts import BREAKER_AND_BUDGET, BUDGET, lua_source
from db.states import Priority
from workers.breaker import BreakerCall, BreakerPolicy, count_keys, log_transition
from workers.forecast import Forecast
from workers.metering import Settlement
from workers.output_estimate import OutputEstimates, OutputPolicy, OutputSample

__all__ = ["Admission", "Bucket", "BucketPolicy", "BudgetCharge", "Charge", "Settled"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Charge:
    """One limit a call counts against: its per-minute size and what this call takes from it."""

    name: str
    limit: int
    cost: float


@dataclass(frozen=True)
class BudgetCharge:
    """What one call reserves from one budget's current period (workers/budgets.py builds it)."""

    spend_key: str
    expiry_key: str
    name: str  # the budget's name, as a wait's reason names it
    limit_usd: float
    cost_usd: float
    resets_in_s: float  # until the period ends: the longest a call may wait for its room
    keep_ms: int  # how long the period's keys live


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
    # Learned output reservations (workers/output_estimate.py), on deployments with learn_output.
    outputs: OutputPolicy = field(default_factory=OutputPolicy)

    def reservation_ttl_s(self, deployment: Deployment) -> float:
        """How long a reservation on ``deployment`` lives unsettled. It must outlive the call: an
        expired one is settled as nothing (no refund, and an under-estimate is never charged)."""
        read_s = deployment.timeout_s or self.call_timeout_s
        connect_s = deployment.connect_timeout_s or self.connect_timeout_s
        return read_s + connect_s + self.reservation_margin_s


@dataclass(frozen=True)
class Admission:
    """The bucket's answer to one take."""

    # open: the breaker keeps it shut; budget: a budget has no room for the call's worst case
    status: Literal["granted", "wait", "never", "open", "budget"]
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
        # The learned output of each deployment and route, read at most every few seconds.
        self.outputs = OutputEstimates(client, self.policy.outputs)
        self._take = client.register_script(lua_source("bucket_take.lua", BREAKER_AND_BUDGET))
        self._settle = client.register_script(lua_source("bucket_settle.lua", BREAKER_AND_BUDGET))
        self._budget_take = client.register_script(lua_source("budget_take.lua", BUDGET))
        self._budget_settle = client.register_script(lua_source("budget_settle.lua", BUDGET))
        # On a Redis Cluster a tenant's budget keys live in another slot than a deployment's:
        # there they are reserved by a script of their own just before the take.
        self._budgets_apart = is_cluster(client)

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
        budgets: Sequence[BudgetCharge] = (),
    ) -> Admission:
        """Take every charge at once, the budgets' included, or nothing. One round trip (two on a
        Redis Cluster with budgets: theirs first, given back unless the take grants)."""
        if budgets and self._budgets_apart:
            refused = self._reserve_budgets(reservation_id, budgets, ttl_s)
            if refused is not None:
                return refused
            taken = self.take(
                deployment,
                reservation_id,
                charges,
                priority=priority,
                ttl_s=ttl_s,
                tenant=tenant,
                tenant_charges=tenant_charges,
            )
            if taken.status != "granted":
                self.settle_budgets(budgets, reservation_id, 0.0)
            return taken
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
        args += [len(script_keys) + 1, max((b.keep_ms for b in budgets), default=0), len(budgets)]
        for budget in budgets:
            script_keys += [budget.spend_key, budget.expiry_key]
            args += [budget.name, repr(budget.limit_usd), repr(budget.cost_usd)]
        if self.breaker is not None:
            args += [int(self.breaker.open_s * 1000), self.breaker.probes]
        status, amount, reason = self._take(keys=script_keys, args=args)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if status in (3, 4):
            return _budget_wait(budgets, reason, in_flight=status == 3 and int(amount) == 1, lost=status == 4)
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
        sample: OutputSample | None = None,
    ) -> Settled:
        """Give back (or take) the difference between reserved and used; learn from headers; with
        a breaker policy and the ``call``, count it in the deployment's breaker; push the call's
        real output on its route's ``sample`` list (learned output reservations)."""
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
        if sample is not None:
            script_keys.append(sample.key)
            kept = self.policy.outputs.samples_kept
            args += [len(script_keys), kept, int(self.policy.outputs.keep_s * 1000), sample.tokens]
        else:
            args += [0, 0, 0, 0]
        if self.breaker is not None and call is not None:
            args += self.breaker.count_args(call)
        found, transition = self._settle(keys=script_keys, args=args)
        transition = transition.decode() if isinstance(transition, bytes) else str(transition)
        if transition and call is not None:
            log_transition(deployment, transition, self.breaker or BreakerPolicy(), probe=call.probe)
        return Settled(bool(found), transition)

    def _reserve_budgets(
        self, reservation_id: str, budgets: Sequence[BudgetCharge], ttl_s: float
    ) -> Admission | None:
        """budget_take.lua: None when every budget took the call's cost, else why it waits."""
        args: list[str | float | int] = [self._clock(), reservation_id, int(ttl_s * 1000)]
        args += [max(b.keep_ms for b in budgets), len(budgets)]
        for budget in budgets:
            args += [budget.name, repr(budget.limit_usd), repr(budget.cost_usd)]
        script_keys = [k for b in budgets for k in (b.spend_key, b.expiry_key)]
        status, amount, reason = self._budget_take(keys=script_keys, args=args)
        if status == 1:
            return None
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        return _budget_wait(budgets, reason, in_flight=status == 3 and int(amount) == 1, lost=status == 4)

    def settle_budgets(self, budgets: Sequence[BudgetCharge], reservation_id: str, cost_usd: float) -> None:
        """The call's budget reservations become its real cost (0: no call was made). An
        unsettled one expires and counts at what it held, so a failure here loses no spend."""
        if budgets:
            script_keys = [k for b in budgets for k in (b.spend_key, b.expiry_key)]
            self._budget_settle(keys=script_keys, args=[reservation_id, repr(float(cost_usd))])


# Room on a budget comes back when calls in flight settle for less than they held (soon), or at
# the period's end; a count that was lost is rebuilt at the request's next run.
BUDGET_IN_FLIGHT_WAIT_S = 2.0
BUDGET_LOST_WAIT_S = 1.0


def _budget_wait(budgets: Sequence[BudgetCharge], name: str, *, in_flight: bool, lost: bool) -> Admission:
    budget = next((b for b in budgets if b.name == name), None)
    if lost:
        wait_s = BUDGET_LOST_WAIT_S
    elif in_flight or budget is None:
        wait_s = BUDGET_IN_FLIGHT_WAIT_S
    else:
        wait_s = max(BUDGET_IN_FLIGHT_WAIT_S, budget.resets_in_s)
    return Admission("budget", wait_s=wait_s, reason=f"budget:{name}")
