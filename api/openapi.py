"""The OpenAPI document says what each route really answers: its errors in its door's dialect.

Every route may answer 400 (a bad parameter or header) and 413 (the body cap, api/body_limit.py);
every route behind a key 401; a route that takes an id 404; a results route 410 once its results
are purged. FastAPI's own 422 is dropped from the document: validation errors are answered 400,
in the door's dialect (api/errors.py), so a 422 was a promise never kept.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

Door = Literal["native", "openai", "anthropic"]


class NativeErrorDetail(BaseModel):
    type: str
    message: str
    errors: list[dict[str, Any]] | None = None


class NativeError(BaseModel):
    error: NativeErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    errors: list[dict[str, Any]] | None = None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


_MODELS: dict[Door, type[BaseModel]] = {
    "native": NativeError,
    "openai": OpenAIError,
    "anthropic": AnthropicError,
}
_WHY = {
    400: "Bad input; the message names what and where.",
    401: "Missing, invalid or revoked API key.",
    403: "The key is a tenant's; this needs an admin key (headrace keys create --admin).",
    404: "No such id for this key (another tenant's ids are unknown too).",
    410: "The results were purged, HEADRACE_FILE_RETENTION_DAYS after the batch ended.",
    413: "The body is over its cap (or a line over HEADRACE_MAX_LINE_BYTES, or too many requests).",
    415: "The body is neither JSON, JSONL nor multipart.",
}


def errors(door: Door, *statuses: int, authenticated: bool = True) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route of ``door`` that may also answer ``statuses``."""
    every = {400, 413} | ({401} if authenticated else set()) | set(statuses)
    return {status: {"model": _MODELS[door], "description": _WHY[status]} for status in sorted(every)}


def stream(media_type: str, what: str) -> dict[int | str, dict[str, Any]]:
    """The 200 of a streamed download, declared with its real content type."""
    return {200: {"description": what, "content": {media_type: {"schema": {"type": "string"}}}}}


def install_openapi(app: FastAPI) -> None:
    """FastAPI's document, less the 422 answers no route gives."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            components = document.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
