"""The usage report computed by PostgreSQL: one grouped scan of the requests (two when grouped by
deployment) instead of every row in Python.

The same report as ``db.usage`` builds row by row (which SQLite, the embedded default, keeps):
each group's figures and the totals come from one ``GROUP BY GROUPING SETS ((dims), ())`` per
pass, the per-request percentiles from ``percentile_disc`` (the nearest rank, as
``db.reports.percentile``). ``bench/usage_report.py`` measures it on a million requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Select, case, func, select, text, tuple_
from sqlalchemy.orm import Session

from db.models import Attempt, Batch, LlmRequest, Tenant
from db.states import AttemptOutcome, RequestStatus

NONE = "(none)"
_TIME_FORMATS = {"day": "YYYY-MM-DD", "hour": 'YYYY-MM-DD"T"HH24:00"Z"'}


def dimensions(columns: Sequence[str], deployment: Any) -> list[ColumnElement[Any]]:
    """Each grouping column as an expression, in order; ``deployment``: the request's (the one that
    ended it) or the attempt's (the one that made the call)."""
    fixed: dict[str, Any] = {
        "tenant": Tenant.name,
        "route": LlmRequest.model,
        "deployment": deployment,
        "priority": LlmRequest.priority,
    }
    expressions: list[ColumnElement[Any]] = []
    for name in columns:
        if name in fixed:
            expressions.append(fixed[name])
        elif name in _TIME_FORMATS:
            expressions.append(func.to_char(func.timezone("UTC", LlmRequest.created_at), _TIME_FORMATS[name]))
        else:  # an attribution key: the request's tag, or its batch's metadata before tags were kept
            expressions.append(
                case(
                    (LlmRequest.tags.is_(None), Batch.metadata_[name].as_string()),
                    else_=LlmRequest.tags[name].as_string(),
                )
            )
    return [e.label(f"d{i}") for i, e in enumerate(expressions)]


def _grouped(statement: Select[Any], dims: list[ColumnElement[Any]]) -> Select[Any]:
    if not dims:
        return statement
    bare = [d.element for d in dims]
    grouping = func.grouping(*bare).label("is_total")
    return statement.add_columns(grouping).group_by(func.grouping_sets(tuple_(*bare), tuple_()))


def requests_pass(session: Session, scope: Any, columns: Sequence[str]) -> list[Any]:
    if session.get_bind().dialect.name == "postgresql":
        # In memory, a month of requests sorts for the percentiles in a third of the time it takes
        # spilled to disk at the default 4 MB; JIT compiling costs more than it saves here.
        session.execute(text("SET LOCAL work_mem = '64MB'"))
        session.execute(text("SET LOCAL jit = off"))
    return list(session.execute(requests_statement(scope, columns)))


def attempts_pass(session: Session, scope: Any, columns: Sequence[str]) -> list[Any]:
    return list(session.execute(attempts_statement(scope, columns)))


def requests_statement(scope: Any, columns: Sequence[str]) -> Select[Any]:
    """Requests per group: how many, how they ended, tokens per request (mean, p50, p95)."""
    dims = dimensions(columns, LlmRequest.deployment)
    status = LlmRequest.status
    statement = select(
        *dims,
        func.count().label("requests"),
        *(func.count().filter(status == s.value).label(s.value) for s in _ENDS),
        func.avg(LlmRequest.input_tokens).label("in_mean"),
        func.percentile_disc(0.5).within_group(LlmRequest.input_tokens).label("in_p50"),
        func.percentile_disc(0.95).within_group(LlmRequest.input_tokens).label("in_p95"),
        func.avg(LlmRequest.output_tokens).label("out_mean"),
        func.percentile_disc(0.5).within_group(LlmRequest.output_tokens).label("out_p50"),
        func.percentile_disc(0.95).within_group(LlmRequest.output_tokens).label("out_p95"),
        # The calls' figures, as each request keeps their sums: no scan of the calls unless they
        # are grouped by the deployment that made them (attempts_statement).
        func.coalesce(func.sum(LlmRequest.attempt_count), 0).label("attempts"),
        func.coalesce(func.sum(LlmRequest.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(LlmRequest.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(LlmRequest.cache_read_tokens), 0).label("cache_read_tokens"),
        func.coalesce(func.sum(LlmRequest.cache_write_tokens), 0).label("cache_write_tokens"),
        func.coalesce(func.sum(LlmRequest.cost_usd), 0).label("cost"),
        func.coalesce(func.sum(LlmRequest.overhead_cost_usd), 0).label("overhead"),
        func.coalesce(func.sum(LlmRequest.unpriced_attempts), 0).label("unpriced"),
        func.count().filter(LlmRequest.served_from.is_not(None)).label("served_from_cache"),
        func.coalesce(func.sum(LlmRequest.saved_cost_usd), 0).label("saved"),
    )
    return _grouped(scope(statement), dims)


def attempts_statement(scope: Any, columns: Sequence[str]) -> Select[Any]:
    """Calls per group: how many, their tokens, cost, overhead and unpriced calls."""
    dims = dimensions(columns, Attempt.deployment)
    cost = Attempt.cost_usd
    statement = select(
        *dims,
        func.count().label("attempts"),
        func.coalesce(func.sum(Attempt.input_tokens), 0).label("input_tokens"),
        func.coalesce(func.sum(Attempt.output_tokens), 0).label("output_tokens"),
        func.coalesce(func.sum(Attempt.cache_read_tokens), 0).label("cache_read_tokens"),
        func.coalesce(func.sum(Attempt.cache_write_tokens), 0).label("cache_write_tokens"),
        func.coalesce(func.sum(cost), 0).label("cost"),
        func.coalesce(func.sum(cost).filter(Attempt.outcome != AttemptOutcome.SUCCESS.value), 0).label(
            "overhead"
        ),
        func.count()
        .filter(cost.is_(None), Attempt.outcome != AttemptOutcome.IN_FLIGHT.value)
        .label("unpriced"),
    ).join_from(Attempt, LlmRequest, LlmRequest.id == Attempt.request_id)
    # Sums add up: the totals are the groups' sum, so a plain GROUP BY (hashed, no sort) does.
    grouped: Select[Any] = scope(statement)
    return grouped.group_by(*(d.element for d in dims)) if dims else grouped


_ENDS = (RequestStatus.SUCCEEDED, RequestStatus.FAILED, RequestStatus.CANCELLED, RequestStatus.EXPIRED)


def key_of(row: Any, width: int) -> tuple[str, ...] | None:
    """The group's key; None for the totals' row."""
    if width and getattr(row, "is_total", 0):
        return None
    return tuple(NONE if row[i] is None else str(row[i]) for i in range(width))


def as_decimal(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(value or 0)
