"""Budgets as the ledger keeps them: what a tenant (or one tag of its requests) may spend per UTC
day or month, and its degradation ladder; managed by an admin (``PUT /v1/budgets``, ``headrace
budgets``), read by the workers (``workers/budgets.py``, which enforce them in Redis) and by the
API (which refuses new batches at the ladder's ``refuse`` step).

A ladder is a list of steps, each from a share of the limit on (the highest one reached applies):

    defer       bulk and default work waits for the next period; interactive goes on
    downgrade   requests of the routes it maps run on the cheaper route instead (``smart>fast``)
    cache_only  answers the cache holds are served (routes with a cache); any other request gets
                the next step, or is refused when it is the last
    refuse      new batches are refused (429 ``budget_exceeded``); accepted work waits for room

Whatever the ladder says, no call is made whose worst-case cost the period has no room left for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker_config import keys
from db.engine import Database
from db.ids import new_id
from db.models import Attempt, Batch, Budget, LlmRequest, Tenant
from db.types import utcnow

PERIODS = ("day", "month")
ACTIONS = ("defer", "downgrade", "cache_only", "refuse")
ON_ANOMALY = ("none", "pause")
DEFAULT_LADDER = "refuse@1.0"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")
_STEP = re.compile(r"^(?P<action>[a-z_]+)@(?P<at>[0-9.]+)(?::(?P<routes>.+))?$")


class BudgetError(ValueError):
    """A budget that cannot be kept as given; the message names what is wrong."""


@dataclass(frozen=True)
class Step:
    at: float  # share of the limit from which it applies (0 < at <= 1)
    action: str
    routes: Mapping[str, str] = field(default_factory=dict)  # downgrade: route -> cheaper route

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "action": self.action,
            **({"routes": dict(self.routes)} if self.routes else {}),
        }

    def text(self) -> str:
        routes = ",".join(f"{a}>{b}" for a, b in self.routes.items())
        return f"{self.action}@{self.at:g}" + (f":{routes}" if routes else "")


@dataclass(frozen=True)
class BudgetRule:
    """One budget, as the workers and the API use it."""

    id: str
    tenant_id: str
    tenant: str
    name: str
    tag_key: str | None
    tag_value: str | None
    period: str
    limit_usd: Decimal
    ladder: tuple[Step, ...]
    on_anomaly: str = "none"

    def matches(self, tags: Mapping[str, str]) -> bool:
        return self.tag_key is None or tags.get(self.tag_key) == self.tag_value

    @property
    def scope(self) -> str:
        return self.tenant if self.tag_key is None else f"{self.tenant} {self.tag_key}={self.tag_value}"

    def reached(self, spent: Decimal | float) -> tuple[Step, ...]:
        """The ladder's steps a period's settled spend has reached, in order (they add up). A
        billionth of a cent of slack: float sums must not miss a step they reach exactly."""
        if self.limit_usd <= 0:
            return self.ladder
        settled = Decimal(str(spent))
        return tuple(
            s for s in self.ladder if settled >= Decimal(str(s.at)) * self.limit_usd - Decimal("1e-12")
        )

    def keys(self, start: datetime) -> tuple[str, str]:
        """Its Redis keys for the period beginning at ``start``: spend hash, reservation expiry."""
        label = period_label(self.period, start)
        return keys.budget_spend(self.tenant_id, self.id, label), keys.budget_expiry(
            self.tenant_id, self.id, label
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "name": self.name,
            "tag": None if self.tag_key is None else f"{self.tag_key}={self.tag_value}",
            "period": self.period,
            "limit_usd": str(self.limit_usd),
            "ladder": [s.as_json() for s in self.ladder],
            "on_anomaly": self.on_anomaly,
        }


# --- Periods (UTC) ---------------------------------------------------------------------------


def period_bounds(period: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The UTC day or month ``now`` falls in: [start, end)."""
    now = (now or utcnow()).astimezone(UTC)
    if period == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def period_label(period: str, start: datetime) -> str:
    return start.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


# --- Parsing what an admin gives ---------------------------------------------------------------


def parse_ladder(spec: str | Sequence[Mapping[str, Any]] | None) -> tuple[Step, ...]:
    """``"defer@0.8,downgrade@0.9:smart>fast,refuse@1"`` (the CLI's spelling; several route pairs
    separated by ``;``) or the API's list of ``{"at", "action", "routes"}``; ``None``: refuse at
    the limit."""
    if spec is None:
        spec = DEFAULT_LADDER
    raw: list[Mapping[str, Any]]
    if isinstance(spec, str):
        raw = [_step_from_text(part.strip()) for part in spec.split(",") if part.strip()]
    else:
        raw = list(spec)
    steps = tuple(_step(i, item) for i, item in enumerate(raw, 1))
    if [s.at for s in steps] != sorted(s.at for s in steps):
        raise BudgetError("ladder: steps must be in order of their share (at), lowest first")
    if any(s.action == "refuse" for s in steps[:-1]):
        raise BudgetError("ladder: refuse must be the last step")
    return steps


def _step_from_text(text: str) -> dict[str, Any]:
    match = _STEP.match(text)
    if match is None:
        raise BudgetError(
            f"ladder step {text!r}: expected action@share, e.g. defer@0.8 or downgrade@0.9:smart>fast"
        )
    routes: dict[str, str] = {}
    for pair in (match["routes"] or "").split(";"):
        if pair.strip():
            source, sep, target = pair.partition(">")
            if not sep or not source.strip() or not target.strip():
                raise BudgetError(f"ladder step {text!r}: a route map is route>cheaper_route")
            routes[source.strip()] = target.strip()
    return {"action": match["action"], "at": match["at"], "routes": routes}


def _step(position: int, item: Mapping[str, Any]) -> Step:
    action = item.get("action")
    if action not in ACTIONS:
        raise BudgetError(
            f"ladder step {position}: action must be one of {', '.join(ACTIONS)}, not {action!r}"
        )
    try:
        at = float(item.get("at"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BudgetError(f"ladder step {position}: at must be a share of the limit, e.g. 0.8") from None
    if not 0 < at <= 1:
        raise BudgetError(f"ladder step {position}: at must be above 0 and at most 1, not {at}")
    routes = item.get("routes") or {}
    if not isinstance(routes, Mapping) or not all(isinstance(v, str) for v in routes.values()):
        raise BudgetError(f"ladder step {position}: routes must map a route to a cheaper route")
    if action == "downgrade" and not routes:
        raise BudgetError(f"ladder step {position}: downgrade needs routes, e.g. downgrade@0.9:smart>fast")
    return Step(at, action, dict(routes))


def parse_limit(value: object) -> Decimal:
    try:
        limit = Decimal(str(value))
    except InvalidOperation:
        raise BudgetError(f"limit_usd must be a number of dollars, not {value!r}") from None
    if not limit.is_finite() or limit < 0:
        raise BudgetError(f"limit_usd must be zero or more, not {value!r}")
    return limit


def parse_tag(tag: str | None) -> tuple[str | None, str | None]:
    if not tag:
        return None, None
    key, sep, value = tag.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise BudgetError(f"tag must be key=value (e.g. feature=search), not {tag!r}")
    return key.strip(), value.strip()


# --- Kept in the ledger ------------------------------------------------------------------------


def _rule(budget: Budget, tenant: str) -> BudgetRule:
    return BudgetRule(
        id=budget.id,
        tenant_id=budget.tenant_id,
        tenant=tenant,
        name=budget.name,
        tag_key=budget.tag_key,
        tag_value=budget.tag_value,
        period=budget.period,
        limit_usd=budget.limit_usd,
        ladder=parse_ladder(budget.ladder),
        on_anomaly=budget.on_anomaly,
    )


def set_budget(
    db: Database,
    tenant: str,
    name: str,
    *,
    limit_usd: object,
    period: str = "month",
    tag: str | None = None,
    ladder: str | Sequence[Mapping[str, Any]] | None = None,
    on_anomaly: str = "none",
) -> BudgetRule:
    """Create or replace the tenant's budget ``name``. Raises BudgetError naming what is wrong."""
    if not _NAME.match(name):
        raise BudgetError(f"budget name {name!r}: letters, digits, and _ . : - (up to 100)")
    if period not in PERIODS:
        raise BudgetError(f"period must be day or month, not {period!r}")
    if on_anomaly not in ON_ANOMALY:
        raise BudgetError(f"on_anomaly must be none or pause, not {on_anomaly!r}")
    limit = parse_limit(limit_usd)
    tag_key, tag_value = parse_tag(tag)
    steps = parse_ladder(ladder)

    def unit(session: Session) -> BudgetRule:
        owner = session.scalars(select(Tenant).where(Tenant.name == tenant)).one_or_none()
        if owner is None:
            raise BudgetError(f"no tenant named {tenant!r}")
        budget = session.scalars(
            select(Budget).where(Budget.tenant_id == owner.id, Budget.name == name)
        ).one_or_none()
        now = utcnow()
        if budget is None:
            budget = Budget(id=new_id("bud"), tenant_id=owner.id, name=name, created_at=now)
            session.add(budget)
        budget.tag_key, budget.tag_value, budget.period = tag_key, tag_value, period
        budget.limit_usd, budget.on_anomaly, budget.updated_at = limit, on_anomaly, now
        budget.ladder = [s.as_json() for s in steps]
        session.flush()
        return _rule(budget, owner.name)

    return db.transact(unit)


def delete_budget(db: Database, tenant: str, name: str) -> bool:
    def unit(session: Session) -> bool:
        budget = session.scalars(
            select(Budget)
            .join(Tenant, Tenant.id == Budget.tenant_id)
            .where(Tenant.name == tenant, Budget.name == name)
        ).one_or_none()
        if budget is None:
            return False
        session.delete(budget)
        return True

    return db.transact(unit)


def budget_rules(session: Session, tenant_ids: Sequence[str] | None = None) -> list[BudgetRule]:
    """Every budget (of ``tenant_ids`` when given), by tenant and name."""
    query = select(Budget, Tenant.name).join(Tenant, Tenant.id == Budget.tenant_id)
    if tenant_ids is not None:
        query = query.where(Budget.tenant_id.in_(tenant_ids))
    rows = session.execute(query.order_by(Tenant.name, Budget.name)).all()
    return [_rule(budget, tenant) for budget, tenant in rows]


def ledger_spend(session: Session, rule: BudgetRule, start: datetime, end: datetime) -> Decimal:
    """What the budget's requests' calls started in [start, end) cost, from the cost rows: the
    truth its Redis count is rebuilt from."""
    query = (
        select(func.coalesce(func.sum(Attempt.cost_usd), 0))
        .join(LlmRequest, LlmRequest.id == Attempt.request_id)
        .join(Batch, Batch.id == LlmRequest.batch_id)
        .where(Batch.tenant_id == rule.tenant_id, Attempt.started_at >= start, Attempt.started_at < end)
    )
    if rule.tag_key is not None:
        query = query.where(LlmRequest.tags[rule.tag_key].as_string() == rule.tag_value)
    return Decimal(session.scalar(query) or 0)
