"""Every error the API answers is JSON, in the dialect of the door it came through.

Native: ``{"error": {"type", "message", "errors"?}}``. Under ``/openai``: OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Under ``/anthropic``: Anthropic's
``{"type": "error", "error": {"type", "message"}}``. So each official SDK raises its own typed
exception with our message in it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# Errors of Headrace's own that keep their type in every dialect (the SDKs raise by status: a 429
# is still their RateLimitError), so that a client can tell a spent budget from a busy provider.
OWN_TYPES = frozenset({"budget_exceeded"})


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.errors = errors
        self.headers = headers
        self.param = param

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.errors is not None:
            error["errors"] = self.errors
        return {"error": error}

    def openai_body(self) -> dict[str, Any]:
        kind = (
            "authentication_error"
            if self.status == 401
            else "server_error"
            if self.status >= 500
            else self.type
            if self.type in OWN_TYPES
            else "invalid_request_error"
        )
        code = {"authentication_error": "invalid_api_key"}.get(self.type, self.type)
        param = self.param or (self.errors[0].get("param") if self.errors else None)
        error: dict[str, Any] = {"message": self.message, "type": kind, "param": param, "code": code}
        if self.errors is not None:
            error["errors"] = self.errors
        return {"error": error}

    def anthropic_body(self) -> dict[str, Any]:
        kind = {
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            410: "not_found_error",  # Anthropic has no "gone": what was purged is not found
            413: "request_too_large",
            429: "rate_limit_error",
        }.get(self.status)
        if self.type in OWN_TYPES:
            kind = self.type
        elif kind is None:
            kind = "api_error" if self.status >= 500 else "invalid_request_error"
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, "not_found", f"no {what} with id {ident!r}")


def error_body(path: str, error: ApiError) -> dict[str, Any]:
    """The error in the dialect of the door ``path`` came through."""
    if path.startswith("/openai/"):
        return error.openai_body()
    if path.startswith("/anthropic/"):
        return error.anthropic_body()
    return error.body()


def render(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, error), status_code=error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"param": ".".join(str(p) for p in err["loc"] if p != "body"), "message": err["msg"]}
            for err in exc.errors()
        ]
        first = errors[0] if errors else {"param": "", "message": "invalid request"}
        message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        return render(request, ApiError(400, "invalid_request", message, errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, RecursionError):
            # FastAPI turns json.loads' RecursionError into a vague "error parsing the body".
            return render(request, ApiError(400, "invalid_request", "the JSON body is nested too deeply"))
        type_ = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ApiError(exc.status_code, type_, str(exc.detail), headers=getattr(exc, "headers", None))
        return render(request, error)
