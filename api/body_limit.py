"""The request-body cap, enforced below every route so that none can forget it.

A body is counted as it arrives, never read whole first: a declared ``Content-Length`` over the
cap is refused before a byte of the body is read, and a streamed (chunked) body is cut the moment
it passes the cap. Batch uploads (native ``POST /v1/batches``, the OpenAI file upload and the
Anthropic batch create, whose JSON body is the batch) may be ``HEADRACE_MAX_BATCH_BYTES``; every
other route ``HEADRACE_MAX_REQUEST_BYTES``. The 413 comes in the dialect of the door it came
through, with ``Connection: close``: the rest of the body is not wanted, and closing is the only
way to stop a client that is still sending it.
"""

from __future__ import annotations

import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, error_body

# The routes whose body is a batch. The multipart envelope around an uploaded file gets a little
# room on top of the cap, so that a file of exactly the cap is still accepted.
UPLOAD_ROUTES = frozenset(
    {("POST", "/v1/batches"), ("POST", "/openai/v1/files"), ("POST", "/anthropic/v1/messages/batches")}
)
MULTIPART_ROOM_BYTES = 64 * 1024


class BodyTooLarge(HTTPException):
    """Raised into the route that reads past the cap. An HTTPException, so that FastAPI's body
    parsing lets it through instead of turning it into a 400; the middleware answers anyway."""

    def __init__(self, cap: int) -> None:
        super().__init__(status_code=413, detail=f"the request body is larger than {cap} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, upload_bytes: int, request_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.request_bytes = request_bytes

    def limits(self, scope: Scope) -> tuple[int, int]:
        """(bytes enforced, bytes named in the refusal: the setting)."""
        if (scope["method"], scope["path"].rstrip("/") or "/") in UPLOAD_ROUTES:
            return self.upload_bytes + MULTIPART_ROOM_BYTES, self.upload_bytes
        return self.request_bytes, self.request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, named = self.limits(scope)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await _answer(scope, send, ApiError(400, "invalid_request", "Content-Length is not a number"))
                return
            if length > cap:
                await _answer(scope, send, _too_large(named, declared=length))
                return
        chunked = "chunked" in Headers(scope=scope).get("transfer-encoding", "").lower()
        expects_body = chunked or (declared is not None and int(declared) > 0)
        await _Limited(self.app, cap, named, expects_body)(scope, receive, send)


class _Limited:
    """One request's counting ``receive``, and a ``send`` that swaps whatever the route answers
    after the cut (a 400 for a truncated body, a 500) for the 413. Any answer given before the
    body was read to its end (a 401 before an upload, a route's own 413) closes the connection:
    the server would otherwise read and drop the rest of the body to keep it alive."""

    def __init__(self, app: ASGIApp, cap: int, named: int, expects_body: bool) -> None:
        self.app, self.cap, self.named = app, cap, named
        self.received = 0
        self.body_done = not expects_body
        self.exceeded = False
        self.started = False
        self.answered = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def limited_receive() -> Message:
            if self.exceeded:  # never read on once the cap is passed
                raise BodyTooLarge(self.named)
            message = await receive()
            if message["type"] == "http.request":
                self.body_done = not message.get("more_body", False)
                self.received += len(message.get("body", b""))
                if self.received > self.cap:
                    self.exceeded = True
                    raise BodyTooLarge(self.named)
            return message

        async def guarded_send(message: Message) -> None:
            if self.exceeded and not self.started:
                if not self.answered:
                    self.answered = True
                    await _answer(scope, send, _too_large(self.named))
                return
            if message["type"] == "http.response.start":
                self.started = True
                if not self.body_done:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not self.exceeded or self.started:
                raise
        if self.exceeded and not self.answered and not self.started:
            self.answered = True
            await _answer(scope, send, _too_large(self.named))


def _too_large(cap: int, *, declared: int | None = None) -> ApiError:
    said = f" (Content-Length: {declared})" if declared is not None else ""
    return ApiError(413, "request_too_large", f"the request body is larger than {cap} bytes{said}")


async def _answer(scope: Scope, send: Send, error: ApiError) -> None:
    body = json.dumps(error_body(scope["path"], error)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
