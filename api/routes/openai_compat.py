"""The OpenAI Batch and Files APIs, as a thin translator over the batch service.

``OpenAI(base_url="http://host/openai/v1", api_key=<headrace key>)`` works unchanged. The
``model`` of each input line names a Headrace route (or a model a deployment serves). Two
metadata keys are Headrace's own: ``headrace_webhook_url`` and ``headrace_priority``. The batch's
metadata and a ``metadata`` object on an input line (next to ``custom_id``) set the requests'
attribution tags (``HEADRACE_ATTRIBUTION_KEYS``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import batch_service, files_service
from api.batch_input import BatchLine, BatchValidator, LineSplitter, batch_tags
from api.compat.openai_objects import (
    NOT_SUCCESS,
    SUCCESS,
    batch_object,
    file_object,
    output_line,
    validation_code,
)
from api.context import AppContext, Context, CurrentTenant, ReadSession
from api.errors import ApiError, not_found
from api.files_service import BatchFile
from api.gc_pause import gc_paused
from api.openapi import errors, stream
from api.routes.batches import accept_batch
from api.schemas import list_page
from api.webhook_settings import checked_webhook_url
from db.models import Batch, File
from db.states import Priority
from db.types import utcnow

router = APIRouter(prefix="/openai/v1", tags=["openai-compatible"])
PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
WINDOW_S = 24 * 3600
UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000},
                    },
                }
            }
        },
    }
}


class BatchCreate(BaseModel):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict[str, Any] | None = None


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata is None:
        return
    if len(metadata) > 16:
        raise ApiError(400, "invalid_request", "metadata holds at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > 512:
            raise ApiError(
                400,
                "invalid_request",
                f"metadata[{key[:64]!r}]: keys at most 64 characters, values at most 512",
                param="metadata",
            )


# --- files -------------------------------------------------------------------------------------


@router.post("/files", responses=errors("openai"), openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    form = await request.form()
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose not in PURPOSES:
        raise ApiError(400, "invalid_request", f"purpose must be one of {sorted(PURPOSES)}", param="purpose")
    if purpose != "batch":
        raise ApiError(
            400, "invalid_request", "Headrace keeps batch input files only (purpose=batch)", param="purpose"
        )
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "invalid_request", "the multipart 'file' part is missing", param="file")
    expires_at = _expires_at(context, form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > context.settings.max_batch_bytes:
            raise ApiError(
                413, "file_too_large", f"a batch file holds at most {context.settings.max_batch_bytes} bytes"
            )
        chunks.append(chunk)
    file = await run_in_threadpool(
        files_service.store_file,
        context.db,
        tenant.id,
        upload.filename or "upload.jsonl",
        purpose,
        b"".join(chunks),
        expires_at=expires_at,
    )
    return file_object(file)


def _expires_at(context: AppContext, anchor: object, seconds: object) -> datetime:
    """OpenAI's ``expires_after`` (anchor ``created_at``, 3600 to 2592000 s), never beyond
    ``HEADRACE_FILE_RETENTION_DAYS``: an upload may ask to be kept less, not more."""
    keep = timedelta(days=context.settings.file_retention_days)
    if anchor is None and seconds is None:
        return utcnow() + keep
    if anchor != "created_at":
        raise ApiError(
            400, "invalid_request", "expires_after[anchor] must be 'created_at'", param="expires_after"
        )
    try:
        asked = int(str(seconds))
    except ValueError:
        asked = -1
    if not 3600 <= asked <= 30 * 24 * 3600:
        raise ApiError(
            400,
            "invalid_request",
            "expires_after[seconds] must be an integer from 3600 to 2592000",
            param="expires_after",
        )
    return utcnow() + min(timedelta(seconds=asked), keep)


@router.get("/files", responses=errors("openai"))
def list_files(
    session: ReadSession,
    context: Context,
    tenant: CurrentTenant,
    after: str | None = None,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    files, has_more = files_service.list_files(
        session,
        context.settings,
        tenant.id,
        limit=limit,
        after=after,
        ascending=order == "asc",
        purpose=purpose,
    )
    data = [file_object(f) for f in files]
    return list_page(data, has_more)


def _batch_file_lines(context: AppContext, file: BatchFile) -> Any:
    statuses = SUCCESS if file.kind == "output" else NOT_SUCCESS
    return batch_service.iter_jsonl(context.db, file.batch.id, output_line, statuses)


@router.get("/files/{file_id}", responses=errors("openai", 404, 410))
def retrieve_file(
    file_id: str, session: ReadSession, context: Context, tenant: CurrentTenant
) -> dict[str, Any]:
    file = files_service.find_file(session, context.settings, tenant.id, file_id)
    if isinstance(file, BatchFile):  # its size is that of the content we would stream
        return file_object(file, size=sum(len(chunk) for chunk in _batch_file_lines(context, file)))
    return file_object(file)


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={**stream("application/octet-stream", "The file's bytes."), **errors("openai", 404, 410)},
)
def file_content(
    file_id: str, session: ReadSession, context: Context, tenant: CurrentTenant
) -> StreamingResponse:
    file = files_service.find_file(session, context.settings, tenant.id, file_id, with_content=True)
    content = _batch_file_lines(context, file) if isinstance(file, BatchFile) else iter([file.content])
    return StreamingResponse(content, media_type="application/octet-stream")


@router.delete("/files/{file_id}", responses=errors("openai", 404))
async def delete_file(file_id: str, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    await run_in_threadpool(files_service.delete_file, context.db, context.settings, tenant.id, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# --- batches -----------------------------------------------------------------------------------


def _lines_from_file(
    context: AppContext, spec: batch_service.BatchSpec, file_id: str
) -> list[BatchLine] | Batch:
    """The file's lines, or (when they are invalid) the failed batch that says why."""
    with context.db.session() as session:
        file = files_service.find_file(session, context.settings, spec.tenant_id, file_id, with_content=True)
        if not isinstance(file, File) or file.purpose != "batch":
            raise ApiError(
                400, "invalid_request", f"file {file_id} is not a batch input file", param="input_file_id"
            )
        content = file.content
    validator = BatchValidator(
        context.config, context.settings.max_batch_lines, tag_keys=context.settings.attribution_tags
    )
    splitter = LineSplitter(context.settings.max_line_bytes)
    try:
        validator.add_json_lines([*splitter.feed(content), *splitter.close()])
        lines = validator.finish()
    except ApiError as refused:
        # OpenAI creates the batch and fails it, with the reasons, rather than answer 4xx.
        code = {
            "empty_batch": "empty_file",
            "batch_too_large": "too_many_tasks",
            "line_too_large": "line_too_large",
        }.get(refused.type)
        errors = [
            {
                "code": code or validation_code(e),
                "line": e.get("line"),
                "message": e["message"],
                "param": e.get("param"),
            }
            for e in refused.errors or []
        ] or [{"code": code or "invalid_request", "line": None, "message": refused.message, "param": None}]
        return batch_service.record_failed_batch(context.db, spec, errors)
    return lines


@router.post("/batches", responses=errors("openai", 404))
async def create_batch(
    payload: BatchCreate, context: Context, tenant: CurrentTenant, background: BackgroundTasks
) -> dict[str, Any]:
    if payload.endpoint != "/v1/chat/completions":
        raise ApiError(
            400, "invalid_request", "Headrace runs /v1/chat/completions batches only", param="endpoint"
        )
    if payload.completion_window != "24h":
        raise ApiError(400, "invalid_request", "completion_window must be '24h'", param="completion_window")
    _check_metadata(payload.metadata)
    metadata = payload.metadata or {}
    try:
        priority = Priority(metadata.get("headrace_priority", Priority.DEFAULT))
    except ValueError:
        raise ApiError(
            400,
            "invalid_request",
            "metadata.headrace_priority must be interactive, default or bulk",
            param="metadata",
        ) from None
    spec = batch_service.BatchSpec(
        tenant_id=tenant.id,
        priority=priority,
        metadata=payload.metadata,
        completion_window_s=WINDOW_S,
        api="openai",
        endpoint=payload.endpoint,
        input_file_id=payload.input_file_id,
        webhook_url=await checked_webhook_url(context, metadata.get("headrace_webhook_url")),
        tags=batch_tags(payload.metadata, context.settings.attribution_tags),
    )
    with gc_paused():  # see api/gc_pause.py: no full collections over a batch being read
        lines = await run_in_threadpool(_lines_from_file, context, spec, payload.input_file_id)
        if isinstance(lines, Batch):
            return batch_object(lines)
        return batch_object(await accept_batch(context, spec, lines, background))


def _openai_batch(session: Any, tenant_id: str, batch_id: str) -> Batch:
    batch = batch_service.get_batch(session, tenant_id, batch_id)
    if batch.api != "openai":
        raise not_found("batch", batch_id)
    return batch


@router.get("/batches", responses=errors("openai"))
def list_batches(
    session: ReadSession,
    tenant: CurrentTenant,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    batches, has_more = batch_service.list_batches(session, tenant.id, limit=limit, after=after, api="openai")
    data = [batch_object(b) for b in batches]
    return list_page(data, has_more)


@router.get("/batches/{batch_id}", responses=errors("openai", 404))
def retrieve_batch(batch_id: str, session: ReadSession, tenant: CurrentTenant) -> dict[str, Any]:
    return batch_object(_openai_batch(session, tenant.id, batch_id))


@router.post("/batches/{batch_id}/cancel", responses=errors("openai", 404))
async def cancel_batch(batch_id: str, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    with context.db.session() as session:
        _openai_batch(session, tenant.id, batch_id)
    return batch_object(await run_in_threadpool(batch_service.cancel_batch, context.db, tenant.id, batch_id))
