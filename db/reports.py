"""Usage summaries read from the ledger: per route (requests) and per deployment (calls)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Attempt, LlmRequest
from db.states import AttemptOutcome, RequestStatus


@dataclass
class UsageRow:
    name: str
    done: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced: int = 0

    def percentile_ms(self, pct: float) -> float | None:
        """Nearest-rank percentile."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[max(math.ceil(pct / 100 * len(ordered)) - 1, 0)]


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
    """Provider calls of the batches per deployment: answered / failed, call latency."""
    rows: dict[str, UsageRow] = defaultdict(lambda: UsageRow(""))
    query = (
        select(
            Attempt.deployment,
            Attempt.outcome,
            Attempt.latency_ms,
            Attempt.input_tokens,
            Attempt.output_tokens,
            Attempt.cost_usd,
        )
        .join(LlmRequest, LlmRequest.id == Attempt.request_id)
        .where(LlmRequest.batch_id.in_(batch_ids))
    )
    for deployment, outcome, latency, tokens_in, tokens_out, cost in session.execute(query):
        row = rows[deployment]
        row.name = deployment
        row.done += outcome == AttemptOutcome.SUCCESS
        row.failed += outcome != AttemptOutcome.SUCCESS
        if latency is not None:
            row.latencies_ms.append(float(latency))
        row.input_tokens += tokens_in
        row.output_tokens += tokens_out
        if cost is None:
            row.unpriced += 1
        else:
            row.cost_usd += cost
    return sorted(rows.values(), key=lambda r: r.name)
