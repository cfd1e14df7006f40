"""Headrace's rows as the Anthropic Message Batches API shows them (api-compat.md §3)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from api.compat.anthropic_message import chat_to_message, error_result
from db.models import Batch, LlmRequest
from db.states import RequestStatus

# Failures that are the request's own fault (Anthropic: do not resubmit as is).
_REQUEST_FAULT_KINDS = {"translation", "invalid_request", "config", "too_large"}


def rfc3339(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def message_batch(batch: Batch, base_url: str) -> dict[str, Any]:
    ended = batch.ended_at is not None
    # Anthropic reports every request as processing until the whole batch has ended.
    counts = {
        "processing": 0 if ended else batch.total_count,
        "succeeded": batch.succeeded_count if ended else 0,
        "errored": batch.failed_count if ended else 0,
        "canceled": batch.cancelled_count if ended else 0,
        "expired": batch.expired_count if ended else 0,
    }
    status = "ended" if ended else "canceling" if batch.cancelled_at else "in_progress"
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": rfc3339(batch.ended_at),
        "created_at": rfc3339(batch.created_at),
        "expires_at": rfc3339(batch.expires_at),
        "cancel_initiated_at": rfc3339(batch.cancelled_at),
        "archived_at": None,
        "results_url": f"{base_url}/anthropic/v1/messages/batches/{batch.id}/results" if ended else None,
    }


def _failure_kind(error: dict[str, Any]) -> str:
    last = error["deployments"][-1] if error.get("deployments") else error
    status = last.get("status")
    if error.get("kind") in _REQUEST_FAULT_KINDS or last.get("kind") in _REQUEST_FAULT_KINDS:
        return "invalid_request_error"
    if isinstance(status, int) and 400 <= status < 500 and status != 429:
        return "invalid_request_error"
    return "api_error"  # the providers' trouble: the request may be sent again as is


def result_line(request: LlmRequest) -> dict[str, Any]:
    result: dict[str, Any]
    if request.status == RequestStatus.SUCCEEDED and request.response is not None:
        try:
            result = {"type": "succeeded", "message": chat_to_message(request.response)}
        except ValueError as exc:  # a provider reply that cannot be shown as a Message
            result = error_result("api_error", f"the answer could not be read as a Message: {exc}")
    elif request.status == RequestStatus.CANCELLED:
        result = {"type": "canceled"}
    elif request.status == RequestStatus.EXPIRED:
        result = {"type": "expired"}
    else:
        error = request.error or {}
        result = error_result(_failure_kind(error), str(error.get("message", "the request failed")))
    return {"custom_id": request.custom_id, "result": result}
