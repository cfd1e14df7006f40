"""What a run carries: ``Deps`` (everything a run needs, built once per worker process) and
``Walk`` (what one run's walk down its route's chain has learned so far)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from broker_config.deployments import Deployment, DeploymentsConfig, Route
from broker_config.settings import Settings
from db.engine import Database
from workers import ledger
from workers.admission import Bucket, BudgetCharge, Estimate, Wait
from workers.breaker import FallbackCounter
from workers.delays import DelayQueue
from workers.leases import Lease, Leases
from workers.providers.base import ProviderAdapter, ProviderReply
from workers.waiting_line import WaitingLine

if TYPE_CHECKING:  # both build on this module
    from workers.budgets import Budgets
    from workers.cached_runs import CacheDeps


@dataclass(frozen=True)
class Deps:
    """Everything a run needs; tests build their own."""

    db: Database
    config: DeploymentsConfig
    settings: Settings
    adapters: Mapping[str, ProviderAdapter]
    bucket: Bucket
    delays: DelayQueue
    leases: Leases
    fallbacks: FallbackCounter
    worker: str  # this process's name on the attempts it makes
    sleep: Callable[[float], None] = field(default=time.sleep)
    # This process's threads waiting for room on a deployment take turns to ask its bucket.
    line: WaitingLine = field(default_factory=WaitingLine)
    budgets: Budgets | None = None  # the tenants' budgets (None: none are enforced)
    cache: CacheDeps | None = None  # the answer cache and its flights (None: no route has a cache)


@dataclass
class Walk:
    """One run's walk down its route's chain, and what it has learned so far."""

    run: ledger.RunStart
    lease: Lease
    route: Route
    deadline: datetime  # no call starts after this: the batch's window, or the route's deadline
    over: bool = False  # the request ended, or this run no longer owns it: stop here
    failures: list[dict[str, Any]] = field(default_factory=list)  # this run's, in order
    soonest_room_s: float | None = None  # the shortest wait a busy deployment asked for
    expected_room_s: float | None = None  # the shortest a busy deployment's line expects
    attempts: int = 0  # the request's attempts so far, all runs included
    billed: int = 0  # calls the provider may have charged for, all runs included
    # What a call reserves from the request's budgets, at its worst case (workers/budgets.py).
    budgets: Callable[[Deployment, Estimate], tuple[BudgetCharge, ...]] = lambda deployment, estimate: ()
    held_by_budget: bool = False  # a budget has no room: the chain stops, the request waits
    # The answer this run got and ended its request with, its deployment and price (for the cache).
    answered: tuple[ProviderReply, Deployment, Decimal | None] | None = None

    def __post_init__(self) -> None:
        self.billed = self.run.billed_attempts

    def busy(self, wait: Wait, deployment: str | None = None) -> None:
        """A deployment cannot take the request for ``wait``; noted as its last error when named."""
        if self.soonest_room_s is None or wait.seconds < self.soonest_room_s:
            self.soonest_room_s = wait.seconds
        expected = max(wait.seconds, wait.expected_s or 0.0)
        if self.expected_room_s is None or expected < self.expected_room_s:
            self.expected_room_s = expected
        if deployment is not None:
            message = f"{wait.reason.replace('_', ' ')}: room again in {wait.seconds:.1f}s"
            self.failures.append(
                {"kind": wait.reason, "deployment": deployment, "message": message, "passes": True}
            )

    def last_errors(self) -> list[dict[str, Any]]:
        """Each deployment's last error, earlier runs' included, in the order they came."""
        by_deployment = {e.get("deployment"): e for e in [*self.run.last_errors, *self.failures]}
        return list(by_deployment.values())
