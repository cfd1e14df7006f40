"""The Anthropic Message Batches API, as a thin translator over the batch service.

``Anthropic(base_url="http://host/anthropic", api_key=<headrace key>)`` works unchanged (the key
as ``Authorization: Bearer`` from SDK 2.x, or ``x-api-key`` from older ones). Each request's
``params.model`` names a Headrace route (or a model a deployment serves). Params that cannot run
become ``errored`` results, as on Anthropic; only envelope problems refuse the batch. A top-level
``metadata`` object (``extra_body`` in the SDK) may carry ``headrace_webhook_url`` and
``headrace_priority``. It and a request's own ``metadata`` (next to ``custom_id``, not
``params.metadata``, which goes to the provider) set the requests' attribution tags
(``HEADRACE_ATTRIBUTION_KEYS``); a bad tag makes that request ``errored``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import batch_service
from api.batch_input import BatchLine, batch_tags
from api.compat.anthropic_objects import message_batch, result_line
from api.compat.anthropic_wire import WireError, messages_params_to_chat
from api.context import AppContext, Context, CurrentTenant, ReadSession
from api.errors import ApiError, not_found
from api.files_service import ensure_results_kept
from api.gc_pause import gc_paused
from api.json_body import JsonBodyError, decode_object
from api.openapi import errors, stream
from api.routes.batches import accept_batch
from api.schemas import list_page
from api.webhook_settings import checked_webhook_url
from db.attribution import TagError, attribution_tags
from db.models import Batch, Tenant
from db.states import Priority
from db.types import utcnow

router = APIRouter(prefix="/anthropic/v1/messages/batches", tags=["anthropic-compatible"])
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
WINDOW_S = 24 * 3600
METADATA_MAX_BYTES = 16_384
CREATE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["custom_id", "params"],
                                "properties": {"custom_id": {"type": "string"}, "params": {"type": "object"}},
                            },
                        },
                        "metadata": {"type": "object"},
                    },
                }
            }
        },
    }
}


def _base_url(context: AppContext, request: Request) -> str:
    return (context.settings.public_base_url or str(request.base_url)).rstrip("/")


def _require_version(request: Request) -> None:
    if not request.headers.get("anthropic-version"):
        raise ApiError(400, "invalid_request", "anthropic-version: header is required")


def _line(context: AppContext, index: int, item: Any, seen: set[str]) -> BatchLine:
    where = f"requests.{index}"
    if index >= context.settings.max_batch_lines:
        raise ApiError(
            413, "batch_too_large", f"a batch holds at most {context.settings.max_batch_lines} requests"
        )
    if not isinstance(item, dict):
        raise ApiError(400, "invalid_request", f"{where}: must be an object with custom_id and params")
    custom_id, params, own = item.get("custom_id"), item.get("params"), item.get("metadata")
    if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
        raise ApiError(400, "invalid_request", f"{where}.custom_id: 1 to 64 of a-z, A-Z, 0-9, _ and -")
    if custom_id in seen:
        raise ApiError(400, "invalid_request", f"{where}.custom_id: duplicate custom_id {custom_id!r}")
    seen.add(custom_id)
    if not isinstance(params, dict):
        raise ApiError(400, "invalid_request", f"{where}.params: must be an object")
    error, body, model = None, {}, str(params.get("model", ""))
    try:
        body = messages_params_to_chat(params)
        if context.config.resolve(model) is None:
            error = {"kind": "config", "message": f"params.model: {model!r} is not served here"}
    except WireError as exc:
        error = {"kind": "invalid_request", "message": str(exc)}
    tags, tag_error = _tags(own, context.settings.attribution_tags)
    return BatchLine(index + 1, custom_id, model, body, error or tag_error, tags)


def _tags(own: Any, keys: tuple[str, ...]) -> tuple[dict[str, str], dict[str, Any] | None]:
    """A request's own attribution tags, or the error that makes it ``errored``."""
    if own is not None and not isinstance(own, dict):
        return {}, {"kind": "invalid_request", "message": "metadata: must be an object"}
    try:
        return attribution_tags(own, keys), None
    except TagError as exc:
        return {}, {"kind": "invalid_request", "message": str(exc)}


def _parse(context: AppContext, raw: bytes) -> tuple[list[BatchLine], dict[str, Any]]:
    """The batch's lines and its metadata; runs in a worker thread (see api/json_body.py)."""
    lines: list[BatchLine] = []
    seen: set[str] = set()
    try:
        members = decode_object(raw, "requests", lambda i, item: lines.append(_line(context, i, item, seen)))
    except BaseException as exc:
        lines.clear()  # freed in this thread, not on the loop with the traceback
        if not isinstance(exc, JsonBodyError):
            raise
        message = str(exc) if exc.index is None else f"requests.{exc.index}: {exc.reason}"
        raise ApiError(400, "invalid_request", message) from None
    if "requests" not in members or not lines:
        raise ApiError(400, "invalid_request", "requests: must be a non-empty list")
    raw_metadata = members.get("metadata")
    if raw_metadata is not None and not isinstance(raw_metadata, dict):
        raise ApiError(400, "invalid_request", "metadata: must be an object")
    metadata: dict[str, Any] = raw_metadata or {}
    if len(json.dumps(metadata)) > METADATA_MAX_BYTES:
        raise ApiError(400, "invalid_request", f"metadata: larger than {METADATA_MAX_BYTES} bytes")
    return lines, metadata


@router.post("", responses=errors("anthropic"), openapi_extra=CREATE_BODY)
async def create(
    request: Request, context: Context, tenant: CurrentTenant, background: BackgroundTasks
) -> dict[str, Any]:
    _require_version(request)
    with gc_paused():  # see api/gc_pause.py: no full collections over a batch being read
        return await _create(request, context, tenant, background)


async def _create(
    request: Request, context: AppContext, tenant: Tenant, background: BackgroundTasks
) -> dict[str, Any]:
    lines, metadata = await run_in_threadpool(_parse, context, await request.body())
    try:
        priority = Priority(metadata.get("headrace_priority", Priority.DEFAULT))
    except ValueError:
        raise ApiError(
            400, "invalid_request", "metadata.headrace_priority: interactive, default or bulk"
        ) from None
    spec = batch_service.BatchSpec(
        tenant_id=tenant.id,
        priority=priority,
        metadata=metadata or None,
        completion_window_s=WINDOW_S,
        api="anthropic",
        webhook_url=await checked_webhook_url(context, metadata.get("headrace_webhook_url")),
        tags=batch_tags(metadata, context.settings.attribution_tags),
    )
    batch = await accept_batch(context, spec, lines, background)
    return message_batch(batch, _base_url(context, request))


def _own(session: Session, tenant_id: str, batch_id: str) -> Batch:
    batch = batch_service.get_batch(session, tenant_id, batch_id)
    if batch.api != "anthropic" or batch.deleted_at is not None:
        raise not_found("message batch", batch_id)
    return batch


@router.get("", responses=errors("anthropic"))
def list_batches(
    request: Request,
    session: ReadSession,
    context: Context,
    tenant: CurrentTenant,
    before_id: str | None = None,
    after_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    batches, has_more = batch_service.list_batches(
        session,
        tenant.id,
        limit=limit,
        after=after_id,
        before=before_id,
        api="anthropic",
        exclude_deleted=True,
    )
    data = [message_batch(b, _base_url(context, request)) for b in batches]
    return list_page(data, has_more)


@router.get("/{batch_id}", responses=errors("anthropic", 404))
def retrieve(
    batch_id: str, request: Request, session: ReadSession, context: Context, tenant: CurrentTenant
) -> dict[str, Any]:
    return message_batch(_own(session, tenant.id, batch_id), _base_url(context, request))


@router.post("/{batch_id}/cancel", responses=errors("anthropic", 404))
async def cancel(batch_id: str, request: Request, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    with context.db.session() as session:
        _own(session, tenant.id, batch_id)
    batch = await run_in_threadpool(batch_service.cancel_batch, context.db, tenant.id, batch_id)
    return message_batch(batch, _base_url(context, request))


@router.delete("/{batch_id}", responses=errors("anthropic", 404))
async def delete(batch_id: str, context: Context, tenant: CurrentTenant) -> dict[str, Any]:
    """Gone from this API once ended; the ledger keeps its requests and costs (the native API still
    shows it)."""

    def unit(session: Session) -> None:
        batch = _own(session, tenant.id, batch_id)
        if batch.ended_at is None:
            raise ApiError(400, "invalid_request", "a batch must end (or be cancelled) before it is deleted")
        batch.deleted_at = utcnow()

    await run_in_threadpool(context.db.transact, unit)
    return {"id": batch_id, "type": "message_batch_deleted"}


@router.get(
    "/{batch_id}/results",
    response_class=StreamingResponse,
    responses={
        **stream("application/x-jsonl", "One result line per request."),
        **errors("anthropic", 404, 410),
    },
)
def results(
    batch_id: str, session: ReadSession, context: Context, tenant: CurrentTenant
) -> StreamingResponse:
    batch = _own(session, tenant.id, batch_id)
    if batch.ended_at is None:
        raise ApiError(400, "invalid_request", f"batch {batch_id} has not ended yet: no results")
    ensure_results_kept(batch, context.settings)
    return StreamingResponse(
        batch_service.iter_jsonl(context.db, batch_id, result_line), media_type="application/x-jsonl"
    )
