"""Usage reports: what the requests of a period cost, grouped by tenant, attribution tags, route,
deployment, priority and day or hour.

Two passes over the ledger, both bounded by the period (a request's accept time):

- its requests: how many, how they ended, and the tokens of each (for mean, p50 and p95);
- their calls (attempts): how many, their tokens and cost, and the overhead: the cost of calls that
  did not answer (retried, fallen back, refused, lost with their run).

A request and all its calls fall in the period and the day or hour it was accepted in. Grouped by
deployment, each call counts under the deployment that made it, and each request under the one
that ended it. Without deployment in the grouping, a group's call tokens and cost are exactly its
requests' (a request's figures are the sums of its calls'), and summed over every group they are
the ledger's cost rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from db import usage_sql
from db.attribution import stored_tags
from db.models import Attempt, Batch, LlmRequest, Tenant
from db.reports import percentile
from db.states import AttemptOutcome, RequestStatus

FIXED_DIMENSIONS = ("tenant", "route", "deployment", "priority")
GRANULARITIES = ("day", "hour")
NONE = "(none)"  # a request without the tag, or a request no deployment ended


@dataclass(frozen=True)
class UsageQuery:
    since: datetime
    until: datetime
    group_by: tuple[str, ...] = ()  # FIXED_DIMENSIONS and attribution tag keys
    granularity: str | None = None  # "day" | "hour" | None
    tenant_ids: Sequence[str] | None = None  # None: every tenant (an admin's report)


@dataclass
class TokenStats:
    per_request: list[int] = field(default_factory=list)
    # (mean, p50, p95) when the database computed them (db/usage_sql.py) instead of this list.
    known: tuple[float | None, float | None, float | None] | None = None

    def summary(self, total: int) -> dict[str, Any]:
        if self.known is not None:
            mean, p50, p95 = self.known
            return {"sum": total, "mean": None if mean is None else round(mean, 1), "p50": p50, "p95": p95}
        n = len(self.per_request)
        return {
            "sum": total,
            "mean": round(sum(self.per_request) / n, 1) if n else None,
            "p50": percentile(self.per_request, 50),
            "p95": percentile(self.per_request, 95),
        }


@dataclass
class UsageGroup:
    key: tuple[str, ...]
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    expired: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_tokens: int = 0  # of input_tokens, written to it
    cost_usd: Decimal = Decimal(0)
    overhead_cost_usd: Decimal = Decimal(0)  # calls that did not answer: retried, fell back, lost
    unpriced_attempts: int = 0
    # Requests answered without a call of their own (answer cache, coalesced), and what the calls
    # that first gave those answers cost: what the cache saved.
    served_from_cache: int = 0
    saved_cost_usd: Decimal = Decimal(0)
    input_per_request: TokenStats = field(default_factory=TokenStats)
    output_per_request: TokenStats = field(default_factory=TokenStats)

    def add(self, other: UsageGroup) -> None:
        for name in ("requests", "succeeded", "failed", "cancelled", "expired", "served_from_cache"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.saved_cost_usd += other.saved_cost_usd
        self.add_calls(other)
        self.input_per_request.per_request += other.input_per_request.per_request
        self.output_per_request.per_request += other.output_per_request.per_request

    def add_calls(self, other: UsageGroup) -> None:
        self.attempts += other.attempts
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cost_usd += other.cost_usd
        self.overhead_cost_usd += other.overhead_cost_usd
        self.unpriced_attempts += other.unpriced_attempts


@dataclass
class UsageReport:
    query: UsageQuery
    columns: tuple[str, ...]  # the group's key names, in order
    groups: list[UsageGroup]
    total: UsageGroup


_STATUS_FIELD = {
    RequestStatus.SUCCEEDED: "succeeded",
    RequestStatus.FAILED: "failed",
    RequestStatus.CANCELLED: "cancelled",
    RequestStatus.EXPIRED: "expired",
}


def usage_report(session: Session, query: UsageQuery, tag_keys: Sequence[str]) -> UsageReport:
    """The report; ``tag_keys``: the attribution keys (a request's tags, its batch's metadata for
    requests accepted before tags were kept)."""
    columns = (*query.group_by, *((query.granularity,) if query.granularity else ()))
    if session.get_bind().dialect.name == "postgresql":
        return _aggregated(session, query, columns)
    groups: dict[tuple[str, ...], UsageGroup] = {}

    def group(key: tuple[str, ...]) -> UsageGroup:
        found = groups.get(key)
        if found is None:
            found = groups[key] = UsageGroup(key)
        return found

    for row in _rows(session, _requests(query)):
        dims = _dims(row, row.deployment, tag_keys)
        found = group(tuple(dims[c] for c in columns))
        found.requests += 1
        status_field = _STATUS_FIELD.get(RequestStatus(row.status))
        if status_field:
            setattr(found, status_field, getattr(found, status_field) + 1)
        found.input_per_request.per_request.append(row.input_tokens)
        if row.served_from is not None:
            found.served_from_cache += 1
            found.saved_cost_usd += row.saved_cost_usd
        found.output_per_request.per_request.append(row.output_tokens)
    for row in _rows(session, _attempts(query)):
        dims = _dims(row, row.attempt_deployment, tag_keys)
        found = group(tuple(dims[c] for c in columns))
        found.attempts += 1
        found.input_tokens += row.attempt_input_tokens
        found.output_tokens += row.attempt_output_tokens
        found.cache_read_tokens += row.attempt_cache_read_tokens
        found.cache_write_tokens += row.attempt_cache_write_tokens
        if row.attempt_cost is None:
            found.unpriced_attempts += row.outcome != AttemptOutcome.IN_FLIGHT  # not ended: no cost yet
            continue
        found.cost_usd += row.attempt_cost
        if row.outcome != AttemptOutcome.SUCCESS:
            found.overhead_cost_usd += row.attempt_cost
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))
    total = UsageGroup(())
    for one in ordered:
        total.add(one)
    return UsageReport(query, columns, ordered, total)


def _aggregated(session: Session, query: UsageQuery, columns: tuple[str, ...]) -> UsageReport:
    """The same report, each figure computed by PostgreSQL (``db/usage_sql.py``)."""
    groups: dict[tuple[str, ...], UsageGroup] = {}
    total = UsageGroup(())

    def group(row: Any) -> UsageGroup:
        key = usage_sql.key_of(row, len(columns))
        return total if key is None else groups.setdefault(key, UsageGroup(key))

    def scope(statement: Select[Any]) -> Select[Any]:
        return _scoped(statement, query, tenant_names="tenant" in columns)

    by_call = "deployment" in columns  # calls count under the deployment that made them
    for row in usage_sql.requests_pass(session, scope, columns):
        found = group(row)
        found.requests = row.requests
        found.succeeded, found.failed = row.succeeded, row.failed
        found.cancelled, found.expired = row.cancelled, row.expired
        found.input_per_request.known = (_float(row.in_mean), row.in_p50, row.in_p95)
        found.output_per_request.known = (_float(row.out_mean), row.out_p50, row.out_p95)
        found.served_from_cache = int(row.served_from_cache)
        found.saved_cost_usd = usage_sql.as_decimal(row.saved)
        if not by_call:
            _calls(found, row)
    for row in usage_sql.attempts_pass(session, scope, columns) if by_call else ():
        found = group(row)
        _calls(found, row)
        total.add_calls(found)  # sums add up: this pass has no totals' row
    if not columns:  # one row, ungrouped: the totals are its group
        total = groups.setdefault((), total)
    ordered = sorted(groups.values(), key=lambda g: (-g.cost_usd, g.key))
    return UsageReport(query, columns, ordered, total)


def _calls(found: UsageGroup, row: Any) -> None:
    found.attempts, found.unpriced_attempts = int(row.attempts), int(row.unpriced)
    found.input_tokens, found.output_tokens = int(row.input_tokens), int(row.output_tokens)
    found.cache_read_tokens, found.cache_write_tokens = (
        int(row.cache_read_tokens),
        int(row.cache_write_tokens),
    )
    found.cost_usd = usage_sql.as_decimal(row.cost)
    found.overhead_cost_usd = usage_sql.as_decimal(row.overhead)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _requests(query: UsageQuery) -> Select[Any]:
    return _scoped(
        select(
            LlmRequest.status,
            LlmRequest.deployment,
            LlmRequest.input_tokens,
            LlmRequest.output_tokens,
            LlmRequest.served_from,
            LlmRequest.saved_cost_usd,
            *_DIM_COLUMNS,
        ),
        query,
    )


def _attempts(query: UsageQuery) -> Select[Any]:
    statement = select(
        Attempt.deployment.label("attempt_deployment"),
        Attempt.outcome,
        Attempt.input_tokens.label("attempt_input_tokens"),
        Attempt.output_tokens.label("attempt_output_tokens"),
        Attempt.cache_read_tokens.label("attempt_cache_read_tokens"),
        Attempt.cache_write_tokens.label("attempt_cache_write_tokens"),
        Attempt.cost_usd.label("attempt_cost"),
        *_DIM_COLUMNS,
    ).join(LlmRequest, LlmRequest.id == Attempt.request_id)
    return _scoped(statement, query)


_DIM_COLUMNS = (
    LlmRequest.model,
    LlmRequest.priority,
    LlmRequest.tags,
    LlmRequest.created_at,
    Batch.metadata_.label("batch_metadata"),
    Tenant.name.label("tenant_name"),
)


def _scoped(statement: Select[Any], query: UsageQuery, *, tenant_names: bool = True) -> Select[Any]:
    """The period's requests (of the query's tenants), with their batch; and their tenant's name,
    unless the statement does not group by it (a join per row saved on a month of requests)."""
    statement = statement.join_from(LlmRequest, Batch, Batch.id == LlmRequest.batch_id)
    if tenant_names:
        statement = statement.join(Tenant, Tenant.id == Batch.tenant_id)
    statement = statement.where(LlmRequest.created_at >= query.since, LlmRequest.created_at < query.until)
    if query.tenant_ids is not None:
        statement = statement.where(Batch.tenant_id.in_(query.tenant_ids))
    return statement


def _rows(session: Session, statement: Select[Any]) -> Iterator[Any]:
    # Streamed in chunks: a month of a busy pool does not sit in memory as ORM rows.
    yield from session.execute(statement.execution_options(yield_per=5000))


def _dims(row: Any, deployment: str | None, tag_keys: Sequence[str]) -> dict[str, str]:
    tags = stored_tags(row.tags, row.batch_metadata)
    created: datetime = row.created_at
    dims = {
        "tenant": row.tenant_name,
        "route": row.model,
        "deployment": deployment or NONE,
        "priority": row.priority,
        "day": created.strftime("%Y-%m-%d"),
        "hour": created.strftime("%Y-%m-%dT%H:00Z"),
    }
    for key in tag_keys:
        dims.setdefault(key, str(tags.get(key, NONE)))
    return dims


def as_json(report: UsageReport) -> dict[str, Any]:
    """The report as the API answers it: amounts as exact decimal strings."""
    from db.types import format_usd

    def one(group: UsageGroup) -> dict[str, Any]:
        per_success = group.cost_usd / group.succeeded if group.succeeded else None
        per_success_text = format_usd(per_success.quantize(Decimal("1e-10"))) if per_success else None
        return {
            "group": dict(zip(report.columns, group.key, strict=False)),  # the total's key is ()
            "requests": group.requests,
            "succeeded": group.succeeded,
            "failed": group.failed,
            "cancelled": group.cancelled,
            "expired": group.expired,
            "attempts": group.attempts,
            "input_tokens": group.input_per_request.summary(group.input_tokens),
            "output_tokens": group.output_per_request.summary(group.output_tokens),
            "cache_read_tokens": group.cache_read_tokens,
            "cache_write_tokens": group.cache_write_tokens,
            "cost_usd": format_usd(group.cost_usd),
            "overhead_cost_usd": format_usd(group.overhead_cost_usd),
            "cost_per_success_usd": per_success_text,
            "unpriced_attempts": group.unpriced_attempts,
            "served_from_cache": group.served_from_cache,
            "cache_hit_rate": round(group.served_from_cache / group.requests, 4) if group.requests else None,
            "saved_cost_usd": format_usd(group.saved_cost_usd),
        }

    query = report.query
    return {
        "object": "usage_report",
        "since": query.since.isoformat(),
        "until": query.until.isoformat(),
        "group_by": list(query.group_by),
        "granularity": query.granularity,
        "data": [one(g) for g in report.groups],
        "total": {k: v for k, v in one(report.total).items() if k != "group"},
    }


__all__ = ["FIXED_DIMENSIONS", "GRANULARITIES", "UsageQuery", "UsageReport", "as_json", "usage_report"]
