"""The simulator's HTTP surface: two provider endpoints, OpenAI's embeddings and the /_sim control plane.

POST /v1/embeddings answers deterministic pseudo-embeddings (headrace/simulator/embeddings.py).

Control plane (plain JSON, no auth):
    GET  /_sim/health            {"status": "ok"}
    GET  /_sim/stats?records=N   counters, peaks, per-second admissions and the last N call records
    GET  /_sim/config            the current SimConfig
    POST /_sim/config            a partial SimConfig; answers the merged config (400 if invalid)
    POST /_sim/reset             clears counters, buckets and the fault/jitter streams
"""

from __future__ import annotations

import json

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from headrace.simulator.anthropic_dialect import AnthropicDialect
from headrace.simulator.calls import SimState, handle_call
from headrace.simulator.config import SimConfig
from headrace.simulator.dialect import Dialect, SimError
from headrace.simulator.embeddings import embeddings_body
from headrace.simulator.openai_dialect import OpenAIDialect

_ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def create_app(config: SimConfig) -> FastAPI:
    """A fresh simulator app with its own state (buckets, counters, seeded streams)."""
    state = SimState(config)
    openai_dialect, anthropic_dialect = OpenAIDialect(), AnthropicDialect()
    app = FastAPI(title="Headrace provider simulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sim = state

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle_call(openai_dialect, state, request)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await handle_call(anthropic_dialect, state, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        request_id = openai_dialect.new_request_id()
        headers = openai_dialect.response_headers(request_id, 0)
        try:
            openai_dialect.authenticate(request.headers, state.config.require_api_key)
            try:
                payload = json.loads(await request.body())
            except ValueError:
                payload = None
            body = embeddings_body(payload)
        except SimError as error:
            return JSONResponse(
                openai_dialect.error_body(error, request_id), status_code=error.status, headers=headers
            )
        return JSONResponse(body, headers=headers)

    @app.get("/_sim/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/_sim/stats")
    async def stats(request: Request) -> Response:
        raw = request.query_params.get("records")
        if raw is not None and not raw.isdigit():
            return JSONResponse({"error": "records must be a non-negative integer"}, status_code=400)
        return JSONResponse(state.stats.snapshot(None if raw is None else int(raw)))

    @app.get("/_sim/config")
    async def get_config() -> Response:
        return JSONResponse(state.config.model_dump(mode="json"))

    @app.post("/_sim/config")
    async def set_config(request: Request) -> Response:
        try:
            patch = json.loads(await request.body())
            if not isinstance(patch, dict):
                raise ValueError("expected a JSON object with SimConfig fields")
            config = state.reconfigure(patch)
        except ValidationError as error:
            return JSONResponse({"error": error.errors(include_url=False, include_context=False)}, 400)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return JSONResponse(config.model_dump(mode="json"))

    @app.post("/_sim/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse({"status": "reset"})

    @app.api_route("/{path:path}", methods=_ALL_METHODS)
    async def not_found(request: Request, path: str) -> Response:
        state.stats.not_found += 1
        dialect = _guess_dialect(request, openai_dialect, anthropic_dialect)
        request_id = dialect.new_request_id()
        if dialect is anthropic_dialect:
            error = SimError(404, f"Not found: {request.method} /{path}", "not_found_error")
        else:
            error = SimError(404, f"Invalid URL ({request.method} /{path})", "invalid_request_error")
        return JSONResponse(
            dialect.error_body(error, request_id),
            status_code=404,
            headers=dialect.response_headers(request_id, 0),
        )

    return app


def _guess_dialect(request: Request, openai_dialect: Dialect, anthropic_dialect: Dialect) -> Dialect:
    headers = request.headers
    anthropic_headers = "anthropic-version" in headers or "x-api-key" in headers
    if request.url.path.startswith("/v1/messages") or anthropic_headers:
        return anthropic_dialect
    return openai_dialect
