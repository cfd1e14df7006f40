"""Native batch routes: parse, call the batch service, answer a response model."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api import batch_service
from api.batch_input import BatchLine, BatchValidator, batch_tags, lines_from_stream, release
from api.budget_view import refuse_over_budget
from api.context import AppContext, Context, CurrentTenant, ReadSession
from api.errors import ApiError
from api.files_service import ensure_results_kept
from api.gc_pause import gc_paused
from api.json_body import NESTED_TOO_DEEP, JsonBodyError, decode_object, too_deep
from api.openapi import errors, stream
from api.schemas import BatchList, BatchOut, CreateBatchIn
from api.webhook_settings import checked_webhook_url
from broker_config import tracing
from db import reports
from db.models import Batch, Tenant
from db.states import Priority

router = APIRouter(prefix="/v1", tags=["batches"])
JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines", "text/plain")
READ_CHUNK = 1 << 16
INLINE_PUBLISH_MAX = 2000  # larger batches are published right after the answer
_LINE = {
    "type": "object",
    "properties": {
        "custom_id": {"type": "string"},
        "body": {"type": "object"},
        "metadata": {"type": "object", "description": "Attribution tags of this request alone."},
    },
}
# The route reads its body itself (streamed, checked line by line), so FastAPI cannot infer it.
CREATE_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {"type": "array", "items": _LINE},
                        "priority": {"type": "string", "enum": [p.value for p in Priority]},
                        "metadata": {"type": ["object", "null"]},
                        "completion_window_s": {
                            "type": ["integer", "null"],
                            "minimum": 60,
                            "maximum": 604800,
                        },
                        "webhook_url": {"type": ["string", "null"]},
                    },
                }
            },
            "application/jsonl": {
                "schema": {"type": "string", "description": "{custom_id, body, metadata?} lines"}
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "priority": {"type": "string"},
                        "metadata": {"type": "string", "description": "A JSON object."},
                        "webhook_url": {"type": "string"},
                    },
                }
            },
        },
    }
}


def _priority(value: str | None) -> Priority:
    try:
        return Priority(value or Priority.DEFAULT)
    except ValueError:
        raise ApiError(
            400,
            "invalid_request",
            f"priority must be one of {', '.join(p.value for p in Priority)}, not {value!r}",
        ) from None


def _metadata(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        if len(value) > 16_384:
            raise ApiError(400, "invalid_request", "metadata is larger than 16 KiB")
        try:
            value = json.loads(value) if value else None
        except json.JSONDecodeError as exc:
            raise ApiError(400, "invalid_request", f"metadata is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError(400, "invalid_request", f"metadata: {NESTED_TOO_DEEP}") from None
    if value is not None and not isinstance(value, dict):
        raise ApiError(400, "invalid_request", "metadata must be a JSON object")
    if too_deep(value):  # before json.dumps, which would fail on it
        raise ApiError(400, "invalid_request", f"metadata: {NESTED_TOO_DEEP}")
    if value is not None and len(json.dumps(value)) > 16_384:
        raise ApiError(400, "invalid_request", "metadata is larger than 16 KiB")
    return value


def _window(context: AppContext, value: Any) -> int:
    if value in (None, ""):
        return context.settings.default_completion_window_s
    try:
        seconds = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, "invalid_request", "completion_window_s must be an integer") from None
    if not 60 <= seconds <= 7 * 24 * 3600:
        raise ApiError(400, "invalid_request", "completion_window_s must be between 60 and 604800")
    return seconds


def _json_batch(context: AppContext, raw: bytes) -> tuple[CreateBatchIn, list[BatchLine]]:
    """A JSON body's envelope and lines; runs in a worker thread (see api/json_body.py)."""
    validator = BatchValidator(
        context.config,
        context.settings.max_batch_lines,
        where="requests",
        tag_keys=context.settings.attribution_tags,
    )
    try:
        members = decode_object(raw, "requests", lambda index, obj: validator.add_object(index + 1, obj))
    except BaseException as exc:
        validator.lines.clear()  # freed in this thread, not on the loop with the traceback
        if not isinstance(exc, JsonBodyError):
            raise
        where = None if exc.index is None else [{"line": exc.index + 1, "param": None, "message": str(exc)}]
        raise ApiError(400, "invalid_request", str(exc), errors=where) from None
    try:
        payload = CreateBatchIn.model_validate(members)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, "invalid_request", f"{param}: {err['msg']}") from None
    payload.metadata = _metadata(payload.metadata)
    return payload, validator.finish()


def _stream_lines(context: AppContext, chunks: Any) -> Any:
    settings = context.settings
    return lines_from_stream(
        chunks,
        BatchValidator(context.config, settings.max_batch_lines, tag_keys=settings.attribution_tags),
        max_bytes=settings.max_batch_bytes,
        max_line_bytes=settings.max_line_bytes,
    )


async def _upload_chunks(upload: UploadFile) -> Any:
    while chunk := await upload.read(READ_CHUNK):
        yield chunk


@router.post(
    "/batches",
    status_code=201,
    response_model=BatchOut,
    responses=errors("native", 415),
    openapi_extra=CREATE_BATCH_BODY,
)
async def create_batch(
    request: Request, context: Context, tenant: CurrentTenant, background: BackgroundTasks
) -> BatchOut:
    """Submit a batch as JSON ``{requests, priority, metadata}``, or as JSONL (a raw body, or a
    multipart ``file`` field; priority and metadata then come as query or form fields)."""
    with gc_paused():  # see api/gc_pause.py: no full collections over a batch being read
        return await _create_batch(request, context, tenant, background)


async def _create_batch(
    request: Request, context: AppContext, tenant: Tenant, background: BackgroundTasks
) -> BatchOut:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, Any] = dict(request.query_params)
    if content_type == "application/json":
        payload, lines = await run_in_threadpool(_json_batch, context, await request.body())
        priority, metadata = payload.priority, payload.metadata
        params["completion_window_s"] = payload.completion_window_s
        params["webhook_url"] = payload.webhook_url
    elif content_type == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "invalid_request", "multipart upload needs a 'file' field holding the JSONL")
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
        lines = await _stream_lines(context, _upload_chunks(upload))
        priority, metadata = _priority(params.get("priority")), _metadata(params.get("metadata"))
    elif content_type in JSONL_TYPES:
        lines = await _stream_lines(context, request.stream())
        priority, metadata = _priority(params.get("priority")), _metadata(params.get("metadata"))
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send application/json, application/jsonl or multipart/form-data, not {content_type or 'none'}",
        )
    spec = batch_service.BatchSpec(
        tenant_id=tenant.id,
        priority=priority,
        metadata=metadata,
        completion_window_s=_window(context, params.get("completion_window_s")),
        webhook_url=await checked_webhook_url(context, params.get("webhook_url")),
        tags=batch_tags(metadata, context.settings.attribution_tags),
    )
    return BatchOut.of(await accept_batch(context, spec, lines, background))


async def accept_batch(
    context: AppContext, spec: batch_service.BatchSpec, lines: list[BatchLine], background: BackgroundTasks
) -> Batch:
    """Commit the batch; publish it before answering when small, after answering when large (the
    commit already guarantees it runs: a crash before publishing leaves it to the sweep)."""
    publish_now = len(lines) <= INLINE_PUBLISH_MAX
    # The three front doors meet here: one trace per batch, each request's run a child of this span.
    with batch_service.accept_span(spec, len(lines)) as span:
        try:
            await run_in_threadpool(_within_budgets, context, spec, lines)
            batch = await run_in_threadpool(
                batch_service.create_batch, context.db, spec, lines, publish=publish_now
            )
        finally:
            if not publish_now:
                await run_in_threadpool(release, lines)
        if span is not None:
            span.set_attribute("headrace.batch.id", batch.id)
        if not publish_now:
            trace = tracing.inject({})  # published later, still in this batch's trace
            background.add_task(batch_service.publish_batch, context.db, batch.id, context.redis, trace)
    return batch


def _within_budgets(context: AppContext, spec: batch_service.BatchSpec, lines: list[BatchLine]) -> None:
    """429 ``budget_exceeded`` when a budget the batch's work counts against refuses new work."""
    tag_sets = [spec.tags | (line.tags or {}) for line in lines if line.error is None]
    with context.db.session() as session:
        refuse_over_budget(session, context.state_redis, spec.tenant_id, tag_sets)


@router.get("/batches", response_model=BatchList, responses=errors("native"))
def list_batches(
    session: ReadSession,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> BatchList:
    """The tenant's batches, newest first; pass the last id you saw as ``after`` for the next page."""
    batches, has_more = batch_service.list_batches(session, tenant.id, limit=limit, after=after)
    data = [BatchOut.of(b) for b in batches]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=has_more,
    )


@router.get("/batches/{batch_id}", response_model=BatchOut, responses=errors("native", 404))
def get_batch(batch_id: str, session: ReadSession, tenant: CurrentTenant) -> BatchOut:
    """The batch, with the p50/p95 of its successful calls' timings in ``usage``."""
    batch = batch_service.get_batch(session, tenant.id, batch_id)
    return BatchOut.of(batch, reports.call_timings(session, batch.id))


@router.post("/batches/{batch_id}/cancel", response_model=BatchOut, responses=errors("native", 404))
async def cancel_batch(batch_id: str, context: Context, tenant: CurrentTenant) -> BatchOut:
    """Queued requests end ``cancelled`` at once; calls in flight finish; then the batch ends
    ``cancelled`` with whatever finished in its results."""
    batch = await run_in_threadpool(batch_service.cancel_batch, context.db, tenant.id, batch_id)
    return BatchOut.of(batch)


@router.get(
    "/batches/{batch_id}/results",
    response_class=StreamingResponse,
    responses={**stream("application/jsonl", "One result line per request."), **errors("native", 404, 410)},
)
def batch_results(
    batch_id: str, session: ReadSession, context: Context, tenant: CurrentTenant
) -> StreamingResponse:
    """One JSONL line per request, in input order (partial while the batch runs); 410 once the
    results are purged, ``HEADRACE_FILE_RETENTION_DAYS`` after the batch ended."""
    ensure_results_kept(batch_service.get_batch(session, tenant.id, batch_id), context.settings)
    return StreamingResponse(
        batch_service.iter_results(context.db, batch_id),
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{batch_id}.jsonl"'},
    )
