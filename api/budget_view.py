"""Where budgets stand, as the API and the CLI show them, and the ladder's ``refuse`` step at the
door: a new batch with work for a budget past it is refused (429 ``budget_exceeded``, naming the
budget and when it resets), before anything of it is kept.

Counts come from the state Redis (``broker_config/budget_state.py``); a period Redis has no count
for is read from the ledger's cost rows instead (the workers rebuild Redis's count from them on
their next run: this side only reads).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import redis
from sqlalchemy.orm import Session

from api.errors import ApiError
from broker_config.budget_state import read_counts
from db.budgets import BudgetRule, budget_rules, ledger_spend, period_bounds
from db.types import utcnow


@dataclass(frozen=True)
class BudgetView:
    rule: BudgetRule
    start: datetime
    end: datetime
    spent: Decimal
    held: Decimal
    from_ledger: bool  # Redis had no count for the period

    @property
    def reached(self) -> list[str]:
        """The ladder's steps its settled spend has reached."""
        return [s.action for s in self.rule.reached(self.spent)]

    @property
    def refusing(self) -> bool:
        reached = self.reached
        if "refuse" in reached:
            return True
        # A last cache_only step with no cache behind it serves nothing: the door closes too.
        return bool(reached) and self.rule.ladder[-1].action == "cache_only" and "cache_only" in reached

    def as_json(self) -> dict[str, Any]:
        limit = self.rule.limit_usd
        return {
            **self.rule.as_json(),
            "period_start": _iso(self.start),
            "resets_at": _iso(self.end),
            "spent_usd": str(self.spent.quantize(Decimal("0.000001"))),
            "in_flight_usd": str(self.held.quantize(Decimal("0.000001"))),
            "used_share": None if limit <= 0 else round(float(self.spent / limit), 4),
            "steps_reached": self.reached,
            "counted_by": "ledger" if self.from_ledger else "redis",
        }


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def budget_views(
    session: Session, client: redis.Redis, rules: Sequence[BudgetRule], now: datetime | None = None
) -> list[BudgetView]:
    now = now or utcnow()
    bounds = [period_bounds(rule.period, now) for rule in rules]
    key_pairs = [rule.keys(start) for rule, (start, _) in zip(rules, bounds, strict=True)]
    try:
        counts: list[Any] = read_counts(client, key_pairs)
    except redis.RedisError:
        counts = [None] * len(rules)  # Redis away: the ledger still knows what was spent
    views = []
    for rule, (start, end), count in zip(rules, bounds, counts, strict=True):
        if count is None or count.spent is None:
            spent = ledger_spend(session, rule, start, end)
            views.append(BudgetView(rule, start, end, spent, Decimal(0), from_ledger=True))
        else:
            held = Decimal(repr(count.held))
            views.append(BudgetView(rule, start, end, Decimal(repr(count.spent)), held, from_ledger=False))
    return views


def refuse_over_budget(
    session: Session, client: redis.Redis, tenant_id: str, tag_sets: Iterable[Mapping[str, str]]
) -> None:
    """Raise 429 ``budget_exceeded`` if any budget the batch's requests count against has reached
    its ladder's ``refuse`` step."""
    rules = budget_rules(session, [tenant_id])
    if not rules:
        return
    distinct = {tuple(sorted(tags.items())) for tags in tag_sets}
    applicable = [r for r in rules if any(r.matches(dict(tags)) for tags in distinct)]
    for view in budget_views(session, client, applicable):
        if view.refusing:
            resets = _iso(view.end)
            retry_after = max(1, int((view.end - utcnow()).total_seconds()))
            raise ApiError(
                429,
                "budget_exceeded",
                f"budget {view.rule.name!r} ({view.rule.scope}) has spent {view.spent:.4f} of "
                f"{view.rule.limit_usd} USD this {view.rule.period}; new batches are refused until it "
                f"resets at {resets}",
                headers={"Retry-After": str(retry_after)},
                param=view.rule.name,
            )
