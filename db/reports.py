"""Usage summaries read from the ledger: per route (requests), per deployment (calls), and the
call timings of one batch."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Attempt, LlmRequest
from db.states import AttemptOutcome, RequestStatus


@dataclass
class UsageRow:
    name: str
    done: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    first_chunks_ms: list[float] = field(default_factory=list)  # streamed calls' time to first chunk
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0

    def percentile_ms(self, pct: float) -> float | None:
        """Nearest-rank percentile."""
        return percentile(self.latencies_ms, pct)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(pct / 100 * len(ordered)) - 1, 0)]


# A batch's view is polled while it runs: its timings are read from at most this many calls, a
# sample whose percentiles are within a fraction of a percent of the whole batch's.
TIMINGS_SAMPLE = 10_000


def call_timings(session: Session, batch_id: str) -> dict[str, list[int]]:
    """The batch's successful calls (up to TIMINGS_SAMPLE): each timing column's known values, ms.
    ``first_chunk_ms`` and ``generation_ms`` are known for streamed calls only."""
    query = (
        select(Attempt.latency_ms, Attempt.first_chunk_ms, Attempt.generation_ms)
        .join(LlmRequest, LlmRequest.id == Attempt.request_id)
        .where(LlmRequest.batch_id == batch_id, Attempt.outcome == AttemptOutcome.SUCCESS)
        .limit(TIMINGS_SAMPLE)
    )
    timings: dict[str, list[int]] = {"latency_ms": [], "first_chunk_ms": [], "generation_ms": []}
    for row in session.execute(query):
        for name, value in zip(timings, row, strict=True):
            if value is not None:
                timings[name].append(value)
    return timings


def by_route(session: Session, batch_ids: Sequence[str]) -> list[UsageRow]:
    """Requests of the batches per route: ended ok / failed, latency from start to end."""
    rows: dict[str, UsageRow] = defaultdict(lambda: UsageRow(""))
    query = select(
        LlmRequest.model,
        LlmRequest.status,
        LlmRequest.started_at,
        LlmRequest.ended_at,
        LlmRequest.input_tokens,
        LlmRequest.output_tokens,
        LlmRequest.cost_usd,
    ).where(LlmRequest.batch_id.in_(batch_ids))
    for model, status, started, ended, tokens_in, tokens_out, cost in session.execute(query):
        row = rows[model]
        row.name = model
        row.done += status == RequestStatus.SUCCEEDED
        row.failed += status == RequestStatus.FAILED
        if started and ended:
            row.latencies_ms.append((ended - started).total_seconds() * 1000)
        row.input_tokens += tokens_in
        row.output_tokens += tokens_out
        row.cost_usd += cost
    return sorted(rows.values(), key=lambda r: r.name)


def by_deployment(session: Session, batch_ids: Sequence[str]) -> list[UsageRow]:
    """Provider calls of the batches per deployment: answered / failed, call latency, and the
    time to first chunk of streamed calls."""
    rows: dict[str, UsageRow] = defaultdict(lambda: UsageRow(""))
    query = (
        select(
            Attempt.deployment,
            Attempt.outcome,
            Attempt.latency_ms,
            Attempt.first_chunk_ms,
            Attempt.input_tokens,
            Attempt.output_tokens,
            Attempt.cost_usd,
        )
        .join(LlmRequest, LlmRequest.id == Attempt.request_id)
        .where(LlmRequest.batch_id.in_(batch_ids))
    )
    for deployment, outcome, latency, first_chunk, tokens_in, tokens_out, cost in session.execute(query):
        row = rows[deployment]
        row.name = deployment
        row.done += outcome == AttemptOutcome.SUCCESS
        row.failed += outcome != AttemptOutcome.SUCCESS
        if latency is not None:
            row.latencies_ms.append(float(latency))
        if first_chunk is not None:
            row.first_chunks_ms.append(float(first_chunk))
        row.input_tokens += tokens_in
        row.output_tokens += tokens_out
        if cost is None:
            row.unpriced += 1
        else:
            row.cost_usd += cost
    return sorted(rows.values(), key=lambda r: r.name)


@dataclass(frozen=True)
class RecentUsage:
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal


def recent_usage(session: Session, deployments: Sequence[str], since: datetime) -> dict[str, RecentUsage]:
    """Per deployment, the calls started since ``since`` and what they used and cost (in flight
    ones count as calls with nothing used yet). Reads ``ix_attempts_deployment_started_at``."""
    rows = session.execute(
        select(
            Attempt.deployment,
            func.count(),
            func.coalesce(func.sum(Attempt.input_tokens), 0),
            func.coalesce(func.sum(Attempt.output_tokens), 0),
            func.coalesce(func.sum(Attempt.cost_usd), 0),
        )
        .where(Attempt.deployment.in_(deployments), Attempt.started_at >= since)
        .group_by(Attempt.deployment)
    )
    return {name: RecentUsage(int(n), int(i), int(o), Decimal(c or 0)) for name, n, i, o, c in rows}
