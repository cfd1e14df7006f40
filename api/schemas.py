"""Response and request shapes of the native API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from db.models import Batch
from db.reports import percentile
from db.states import Priority
from db.types import format_usd


class CreateBatchIn(BaseModel):
    """A batch as JSON. Lines are checked by hand (not here) so errors carry line numbers."""

    requests: list[Any] = Field(description="[{custom_id, body}], body a Chat Completions request")
    priority: Priority = Priority.DEFAULT
    metadata: dict[str, Any] | None = None
    completion_window_s: int | None = Field(default=None, ge=60, le=7 * 24 * 3600)
    webhook_url: str | None = Field(default=None, description="POSTed a signed event when the batch ends.")


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int
    cancelled: int
    expired: int
    in_progress: int


class Percentiles(BaseModel):
    p50: float
    p95: float
    calls: int = Field(description="Successful calls measured.")

    @classmethod
    def of(cls, values: list[int]) -> Percentiles | None:
        p50, p95 = percentile(values, 50), percentile(values, 95)
        if p50 is None or p95 is None:
            return None
        return cls(p50=p50, p95=p95, calls=len(values))


class TokenUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    # Filled in by GET /v1/batches/{id} only (null in lists, on create and on cancel).
    latency_ms: Percentiles | None = Field(
        default=None, description="Provider call time of the batch's successful calls, ms."
    )
    first_chunk_ms: Percentiles | None = Field(
        default=None,
        description="Time to first chunk of its successful streamed calls (deployments with "
        "stream = true), ms.",
    )
    generation_ms: Percentiles | None = Field(
        default=None, description="Call time after the first chunk, of its successful streamed calls, ms."
    )


class BatchOut(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    status: str
    priority: str
    metadata: dict[str, Any] | None
    created_at: int
    expires_at: int
    ended_at: int | None
    cancelled_at: int | None
    webhook_url: str | None
    request_counts: RequestCounts
    usage: TokenUsage
    cost_usd: str = Field(description="Exact decimal string: the sum of every attempt's cost.")
    unpriced_attempts: int = Field(description="Calls whose price is unknown (not in cost_usd).")

    @classmethod
    def of(cls, batch: Batch, timings: dict[str, list[int]] | None = None) -> BatchOut:
        """The view of ``batch``; with ``timings`` (``db.reports.call_timings``), their percentiles."""
        ended = batch.succeeded_count + batch.failed_count + batch.cancelled_count + batch.expired_count
        return cls(
            id=batch.id,
            status=batch.status,
            priority=batch.priority,
            metadata=batch.metadata_,
            created_at=int(batch.created_at.timestamp()),
            expires_at=int(batch.expires_at.timestamp()),
            ended_at=int(batch.ended_at.timestamp()) if batch.ended_at else None,
            cancelled_at=int(batch.cancelled_at.timestamp()) if batch.cancelled_at else None,
            webhook_url=batch.webhook_url,
            request_counts=RequestCounts(
                total=batch.total_count,
                completed=batch.succeeded_count,
                failed=batch.failed_count,
                cancelled=batch.cancelled_count,
                expired=batch.expired_count,
                in_progress=batch.total_count - ended,
            ),
            usage=TokenUsage(
                input_tokens=batch.input_tokens,
                output_tokens=batch.output_tokens,
                **{name: Percentiles.of(values) for name, values in (timings or {}).items()},
            ),
            cost_usd=format_usd(batch.cost_usd),
            unpriced_attempts=batch.unpriced_attempts,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """The cursor page every list answers with (OpenAI's and Anthropic's shape alike)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
