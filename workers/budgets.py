"""Budgets at run time: which of its tenant's budgets a request counts against, where each stands in
its period, what its ladder does to the request, and what a call reserves from them.

    gate(run, lease, route, deps)       all of the below, before a run walks its chain
    Budgets.applicable(tenant, tags)    the rules (db/budgets.py), re-read every few seconds
    Budgets.standings(rules)            each one's spend this period, from Redis; a count Redis
                                        lost is rebuilt from the ledger's cost rows first
    ladder(run, route, standings, ...)  before the walk: hold it (defer, refuse), or downgrade it
    Budgets.charges(standings, cost)    what admission reserves with the rate-limit room, in the
                                        same Lua step (workers/bucket.py, lua/budget.lua)
    Bucket.settle_budgets(...)          after the call: the reservation becomes the real cost

The reservation is the guarantee: a call is made only when the period's spend, what calls in
flight hold, and this call's worst case (estimated prompt x input price + output cap x output
price) all fit in the limit. The ladder is the policy on top of it, judged on settled spend.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import redis
import structlog

from broker_config import keys
from broker_config.budget_state import read_counts
from broker_config.deployments import Deployment, DeploymentsConfig, Route
from db.budgets import BudgetRule, Step, budget_rules, ledger_spend, period_bounds
from db.engine import Database
from db.states import Priority
from db.types import utcnow
from workers import ledger
from workers.admission import Estimate
from workers.bucket import BudgetCharge
from workers.costing import call_cost_usd
from workers.holds import Hold, hold
from workers.leases import Lease
from workers.ledger_records import RunStart
from workers.providers.base import Usage
from workers.run_deps import Deps

log = structlog.get_logger(__name__)

KEEP_AFTER_PERIOD_S = 86_400.0  # a period's counts outlive it by a day (late settlements)


@dataclass(frozen=True)
class Standing:
    """One budget in its current period."""

    rule: BudgetRule
    start: datetime
    end: datetime
    spent: float  # settled (and reservations whose worker died, at what they held)
    held: float  # open reservations

    @property
    def reached(self) -> tuple[Step, ...]:
        return self.rule.reached(self.spent)

    def keys(self) -> tuple[str, str]:
        return self.rule.keys(self.start)


class Budgets:
    """A worker process's budgets: the rules, read from the ledger at most every ``refresh_s``,
    and their counts in the state Redis."""

    def __init__(self, db: Database, client: redis.Redis, *, refresh_s: float = 5.0) -> None:
        self.db, self.redis, self.refresh_s = db, client, refresh_s
        self._lock = threading.Lock()
        self._rules: list[BudgetRule] = []
        self._read_at = float("-inf")
        self._version: object = None  # the budgets' version in Redis when last read

    def applicable(self, tenant: str, tags: Mapping[str, str]) -> list[BudgetRule]:
        """The budgets of ``tenant`` (by name) that a request with ``tags`` counts against. The
        rules are re-read from the ledger when the budgets' version in Redis moved (a budget was
        set or deleted: it holds from the next run on) and every ``refresh_s`` anyway; if the
        ledger cannot be read, the last ones read stay in force."""
        try:
            version: object = self.redis.get(keys.budgets_version())
        except redis.RedisError:
            version = self._version  # the refresh below still comes
        with self._lock:
            if version != self._version or time.monotonic() - self._read_at >= self.refresh_s:
                try:
                    with self.db.session() as session:
                        self._rules = budget_rules(session)
                    self._read_at, self._version = time.monotonic(), version
                except Exception as exc:  # the rules it had are better than none
                    log.warning("budgets not re-read; the last ones stay in force", error=type(exc).__name__)
            rules = self._rules
        return [r for r in rules if r.tenant == tenant and r.matches(tags)]

    def standings(self, rules: Sequence[BudgetRule], now: datetime | None = None) -> list[Standing]:
        """Where each budget stands this period; one round trip, plus a rebuild from the ledger
        for a count Redis no longer has (restarted without persistence, flushed, expired)."""
        now = now or utcnow()
        bounds = [period_bounds(rule.period, now) for rule in rules]
        key_pairs = [rule.keys(start) for rule, (start, _) in zip(rules, bounds, strict=True)]
        standings = []
        for rule, (start, end), count in zip(rules, bounds, read_counts(self.redis, key_pairs), strict=True):
            standing = Standing(rule, start, end, count.spent or 0.0, count.held)
            standings.append(self._rebuild(standing) if count.spent is None else standing)
        return standings

    def _rebuild(self, standing: Standing) -> Standing:
        """The period's spend from the ledger's cost rows, written only if no one wrote it first
        (HSETNX: several workers may find it missing at once)."""
        with self.db.session() as session:
            spent = float(ledger_spend(session, standing.rule, standing.start, standing.end))
        spend_key, _ = standing.keys()
        if self.redis.hsetnx(spend_key, "spent", repr(spent)):
            self.redis.pexpire(spend_key, _keep_ms(standing.end))
            log.info(
                "budget count rebuilt from the ledger", budget=standing.rule.name, spent_usd=round(spent, 6)
            )
            return Standing(standing.rule, standing.start, standing.end, spent, 0.0)
        spent_now, held = self.redis.hmget(spend_key, ["spent", "held"])
        return Standing(standing.rule, standing.start, standing.end, float(spent_now or 0), float(held or 0))

    def charges(
        self, standings: Sequence[Standing], cost_usd: Decimal | None, recheck_s: float
    ) -> tuple[BudgetCharge, ...]:
        """What a call of worst-case ``cost_usd`` reserves from each budget. A model without a
        known price reserves nothing (its calls are recorded unpriced, and count nothing). A call
        that finds no room waits at most ``recheck_s`` before it looks again (a raised limit)."""
        cost = float(cost_usd or 0)
        now = utcnow()
        result = []
        for standing in standings:
            spend_key, expiry_key = standing.keys()
            result.append(
                BudgetCharge(
                    spend_key,
                    expiry_key,
                    standing.rule.name,
                    float(standing.rule.limit_usd),
                    cost,
                    min(recheck_s, max(0.0, (standing.end - now).total_seconds())),
                    _keep_ms(standing.end),
                )
            )
        return tuple(result)


def _keep_ms(end: datetime) -> int:
    return int(((end - utcnow()).total_seconds() + KEEP_AFTER_PERIOD_S) * 1000)


def gate(
    run: RunStart, lease: Lease, route: Route, deps: Deps
) -> tuple[Route, Callable[[Deployment, Estimate], tuple[BudgetCharge, ...]]] | None:
    """Before a run walks its chain: the route to walk (a downgrade step may send it to a cheaper
    one, noted for its result line) and what each call reserves from its budgets; or None when
    a budget holds it (parked, or ended ``expired`` if its window ends first)."""
    budgets = deps.budgets
    rules = budgets.applicable(run.tenant, run.tags) if budgets is not None else []
    if budgets is None or not rules:
        return route, lambda deployment, estimate: ()
    standings = budgets.standings(rules)
    recheck_s = deps.settings.hold_recheck_s
    result = ladder(run.priority, route, standings, deps.config, recheck_s)
    if result.hold is not None:
        deadline = (
            run.expires_at
            if route.deadline_s is None
            else min(run.expires_at, run.created_at + timedelta(seconds=route.deadline_s))
        )
        hold(deps, run, lease, result.hold, deadline=deadline, route=route.name)
        return None
    if result.route is not None:
        ledger.note_request(deps.db, run.request_id, lease.token, dict(result.notes or {}))
        route = result.route

    def charges(deployment: Deployment, estimate: Estimate) -> tuple[BudgetCharge, ...]:
        worst = call_cost_usd(deployment, Usage(estimate.prompt_tokens, estimate.output_tokens))
        return budgets.charges(standings, worst, recheck_s)

    return route, charges


# --- The ladder -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LadderResult:
    hold: Hold | None = None
    route: Route | None = None  # the cheaper route a downgrade step sends it to
    notes: Mapping[str, str] | None = None  # for the result line: the route used, and why


def ladder(
    priority: str, route: Route, standings: Sequence[Standing], config: DeploymentsConfig, recheck_s: float
) -> LadderResult:
    """What the budgets' ladders do to a request of ``priority`` on ``route`` now. Steps add up
    as spend climbs: past ``defer`` bulk and default work waits; past ``downgrade`` the routes it
    maps run cheaper; past ``cache_only`` what the cache holds is still served (before this gate:
    ``workers/cached_runs.py``) and the rest gets the next step; past ``refuse`` every request
    waits for the budget to have room (a new period, or a raised limit). The first budget that
    holds a request names itself in the reason."""
    downgrade: tuple[Standing, str] | None = None
    for standing in standings:
        actions = _effective(standing.reached, standing.rule.ladder)
        resets = standing.end.isoformat().replace("+00:00", "Z")
        wait_s = min(recheck_s, max(1.0, (standing.end - utcnow()).total_seconds()))
        detail: dict[str, object] = {"budget": standing.rule.name, "resets_at": resets}
        spent = f"budget {standing.rule.name!r} ({standing.rule.scope}) has spent {standing.spent:.4f} of "
        spent += f"{standing.rule.limit_usd} USD"
        if "refuse" in actions:
            message = f"{spent}; it resets at {resets}"
            return LadderResult(Hold("budget_exhausted", message, wait_s, detail))
        if "defer" in actions and priority != Priority.INTERACTIVE:
            message = f"{spent}: {priority} work waits until it resets at {resets}"
            return LadderResult(Hold("budget_deferred", message, wait_s, detail))
        if downgrade is None and "downgrade" in actions:
            for step in standing.reached:
                target = step.routes.get(route.name)
                if step.action == "downgrade" and target:
                    downgrade = (standing, target)
    if downgrade is None:
        return LadderResult()
    standing, target = downgrade
    cheaper = config.resolve(target)
    if cheaper is None:
        log.warning("downgrade target serves nothing; route kept", budget=standing.rule.name, target=target)
        return LadderResult()
    notes = {"route": cheaper.name, "downgraded_from": route.name, "downgraded_by": standing.rule.name}
    return LadderResult(route=cheaper, notes=notes)


def _effective(reached: Sequence[Step], ladder_steps: Sequence[Step]) -> set[str]:
    """The actions in force: a ``cache_only`` step acts as the step after it, or as ``refuse``
    when it is the last one, on what reaches this gate: a request the cache could answer was
    answered before it."""
    actions = {s.action for s in reached}
    if "cache_only" in actions:
        last_cache_only = max(i for i, s in enumerate(ladder_steps) if s.action == "cache_only")
        following = ladder_steps[last_cache_only + 1 :]
        actions.add(following[0].action if following else "refuse")
    return actions
