"""What the worker's ledger writes (``workers.ledger``) take and give: a run's start, a call's
result, a request's end."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from db.states import AttemptOutcome, RequestStatus
from workers.providers.base import Usage


@dataclass(frozen=True)
class RunStart:
    request_id: str
    batch_id: str
    model: str
    body: dict[str, Any]
    priority: str
    expires_at: datetime
    tenant: str
    created_at: datetime
    billed_attempts: int = 0  # earlier calls of this request the provider may have charged for
    park_rounds: int = 0  # times it already waited for provider trouble to pass
    last_errors: tuple[dict[str, Any], ...] = ()  # each deployment's last error, from earlier runs
    tags: dict[str, str] = field(default_factory=dict)  # the request's attribution tags (feature, user, ...)
    tenant_paused: bool = False  # after an anomaly: its bulk and default work is held (workers/holds.py)


@dataclass(frozen=True)
class AttemptResult:
    outcome: AttemptOutcome
    latency_ms: int
    http_status: int | None = None
    usage: Usage | None = None
    cost_usd: Decimal | None = None
    error: dict[str, Any] | None = None
    provider_request_id: str | None = None
    first_chunk_ms: int | None = None  # streamed calls: time to the first chunk of output
    generation_ms: int | None = None  # streamed calls: latency_ms - first_chunk_ms


@dataclass(frozen=True)
class RequestEnd:
    status: RequestStatus
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    deployment: str | None = None
    notes: dict[str, Any] | None = None  # added to the request's notes, for its result line
