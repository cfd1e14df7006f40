"""Headrace's rows as the OpenAI Batch and Files APIs show them (api-compat.md §1, §2)."""

from __future__ import annotations

from typing import Any

from api.files_service import BatchFile, error_file_id, output_file_id
from db.models import Batch, File, LlmRequest
from db.states import BatchStatus, RequestStatus

# Our batch states are OpenAI's, but for "cancelling" which OpenAI spells the same way.
SUCCESS = (RequestStatus.SUCCEEDED.value,)
NOT_SUCCESS = (RequestStatus.FAILED.value, RequestStatus.CANCELLED.value, RequestStatus.EXPIRED.value)


def _ts(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def file_object(file: File | BatchFile, size: int | None = None) -> dict[str, Any]:
    if isinstance(file, BatchFile):
        batch = file.batch
        return {
            "id": file.id,
            "object": "file",
            "bytes": size or 0,
            "created_at": _ts(batch.ended_at),
            "filename": f"{batch.id}_{file.kind}.jsonl",
            "purpose": "batch_output",
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.size_bytes,
        "created_at": _ts(file.created_at),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "expires_at": _ts(file.expires_at),
        "status_details": None,
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    status = batch.status
    ended = batch.ended_at is not None
    not_succeeded = batch.failed_count + batch.cancelled_count + batch.expired_count
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": batch.endpoint or "/v1/chat/completions",
        "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
        "input_file_id": batch.input_file_id or "",
        "completion_window": "24h",
        "status": status,
        "output_file_id": output_file_id(batch) if ended and batch.succeeded_count else None,
        "error_file_id": error_file_id(batch) if ended and not_succeeded else None,
        "created_at": _ts(batch.created_at),
        "in_progress_at": _ts(batch.created_at) if status != BatchStatus.FAILED else None,
        "expires_at": _ts(batch.expires_at),
        "finalizing_at": _ts(batch.ended_at) if status == BatchStatus.COMPLETED else None,
        "completed_at": _ts(batch.ended_at) if status == BatchStatus.COMPLETED else None,
        "failed_at": _ts(batch.ended_at) if status == BatchStatus.FAILED else None,
        "expired_at": _ts(batch.ended_at) if status == BatchStatus.EXPIRED else None,
        "cancelling_at": _ts(batch.cancelled_at),
        "cancelled_at": _ts(batch.ended_at) if status == BatchStatus.CANCELLED else None,
        "request_counts": {
            "total": batch.total_count,
            "completed": batch.succeeded_count,
            "failed": not_succeeded,
        },
        "metadata": batch.metadata_,
        "model": None,
        "usage": {
            "input_tokens": batch.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": batch.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": batch.input_tokens + batch.output_tokens,
        },
    }


def output_line(request: LlmRequest) -> dict[str, Any]:
    """A line of the output file (succeeded) or the error file (everything else)."""
    line: dict[str, Any] = {
        "id": "batch_req_" + request.id.removeprefix("req_"),
        "custom_id": request.custom_id,
    }
    if request.status == RequestStatus.SUCCEEDED:
        return {
            **line,
            "response": {"status_code": 200, "request_id": request.id, "body": request.response},
            "error": None,
        }
    error = request.error or {}
    if request.status in (RequestStatus.EXPIRED, RequestStatus.CANCELLED):
        code = "batch_expired" if request.status == RequestStatus.EXPIRED else "batch_cancelled"
        return {**line, "response": None, "error": {"code": code, "message": error.get("message", code)}}
    # A request the providers refused reads like OpenAI's: the HTTP answer, error in its body.
    last = error.get("deployments", [error])[-1] if error.get("deployments") else error
    status = last.get("status") or 500
    body = {
        "error": {
            "message": error.get("message", "the request failed"),
            "type": last.get("type") or ("invalid_request_error" if 400 <= status < 500 else "server_error"),
            "param": None,
            "code": last.get("code"),
        }
    }
    return {
        **line,
        "response": {"status_code": status, "request_id": request.id, "body": body},
        "error": None,
    }


def validation_code(error: dict[str, Any]) -> str:
    """OpenAI's code for a bad input line (api-compat.md §2.7)."""
    message, param = error.get("message", ""), error.get("param")
    if message.startswith("malformed JSON"):
        return "invalid_json_line"
    if message.startswith("duplicate custom_id"):
        return "duplicate_custom_id"
    if param == "url":
        return "url_mismatch"
    if param == "body.model":
        return "model_not_found"
    return "invalid_request"
