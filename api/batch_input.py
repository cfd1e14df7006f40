"""Reading and checking a batch's lines, from a JSON array or a streamed JSONL upload.

Every bad line is reported (up to ``MAX_REPORTED_ERRORS``) with its line number, custom_id
and the field at fault, so a producer fixes a file in one round trip, not one per error.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.gc_pause import enforce_bound
from api.json_body import NESTED_TOO_DEEP, too_deep
from broker_config.deployments import DeploymentsConfig
from db.attribution import TagError, attribution_tags

MAX_REPORTED_ERRORS = 100
MAX_CUSTOM_ID_CHARS = 512
# Lines are checked in a worker thread a slice at a time: big enough that thread hops cost
# nothing, small enough that the event loop is never starved while a 200 MB upload is read.
CHECK_SLICE_BYTES = 1 << 20
CHECK_SLICE_LINES = 2000
# The checking thread lets the event loop have the GIL this often (time.sleep(0) hands it over at
# once), instead of the interpreter's 5 ms switch interval for each of the loop's wake-ups.
YIELD_EVERY_LINES = 128
_LINE_KEYS = frozenset({"custom_id", "body", "method", "url", "metadata"})
_CHAT_URLS = frozenset({"/v1/chat/completions", "/chat/completions"})


@dataclass(frozen=True)
class BatchLine:
    line_no: int
    custom_id: str
    model: str
    body: dict[str, Any]
    # Set when the line is accepted into the batch but can never run (the Anthropic API reports
    # bad params as an errored result, not as a refused batch): it is stored already failed.
    error: dict[str, Any] | None = None
    # The line's own attribution tags (its ``metadata`` among the attribution keys); the batch's
    # fill in the keys it does not set (batch_service.create_batch).
    tags: dict[str, str] | None = None


@dataclass
class BatchValidator:
    """Accumulates valid lines and located errors; ``finish()`` returns the lines or raises 400."""

    config: DeploymentsConfig
    max_lines: int
    where: str = "line"  # how positions are named in messages: "line" (JSONL) or "requests[i]"
    tag_keys: tuple[str, ...] = ()  # the attribution keys a line's metadata may set (settings)
    lines: list[BatchLine] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    error_count: int = 0
    _first_seen: dict[str, int] = field(default_factory=dict)
    _seen_lines: int = 0

    def _position(self, line_no: int) -> str:
        return f"line {line_no}" if self.where == "line" else f"requests[{line_no - 1}]"

    def _error(self, line_no: int, custom_id: str | None, param: str | None, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line_no, "custom_id": custom_id, "param": param, "message": message})

    def _count(self) -> None:
        self._seen_lines += 1
        if self._seen_lines > self.max_lines:
            raise ApiError(
                413,
                "batch_too_large",
                f"a batch holds at most {self.max_lines} requests; this one has more (stopped reading at "
                f"{self._position(self._seen_lines)})",
            )

    def add_json_line(self, line_no: int, raw: bytes) -> None:
        """One JSONL line; blank lines are skipped."""
        if not raw.strip():
            return
        self._count()
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(line_no, None, None, f"malformed JSON: {exc}")
            return
        except RecursionError:  # json.loads gives up near the interpreter's recursion limit
            self._error(line_no, None, None, NESTED_TOO_DEEP)
            return
        self._check(line_no, obj)

    def add_json_lines(self, lines: Sequence[tuple[int, bytes]]) -> None:
        for n, (line_no, raw) in enumerate(lines, start=1):
            self.add_json_line(line_no, raw)
            if n % YIELD_EVERY_LINES == 0:
                time.sleep(0)
                enforce_bound()

    def add_object(self, line_no: int, obj: Any) -> None:
        self._count()
        self._check(line_no, obj)

    def _check(self, line_no: int, obj: Any) -> None:
        if too_deep(obj):
            custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
            self._error(line_no, custom_id if isinstance(custom_id, str) else None, None, NESTED_TOO_DEEP)
            return
        if not isinstance(obj, dict):
            self._error(line_no, None, None, f"each request must be a JSON object, not {_kind(obj)}")
            return
        custom_id = obj.get("custom_id")
        cid = custom_id if isinstance(custom_id, str) else None
        if custom_id is None:
            self._error(line_no, None, "custom_id", "custom_id is missing")
        elif not isinstance(custom_id, str) or not custom_id:
            self._error(line_no, None, "custom_id", "custom_id must be a non-empty string")
            cid = None
        elif len(custom_id) > MAX_CUSTOM_ID_CHARS:
            self._error(
                line_no, None, "custom_id", f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters"
            )
            cid = None
        elif custom_id in self._first_seen:
            first = self._position(self._first_seen[custom_id])
            self._error(
                line_no, custom_id, "custom_id", f"duplicate custom_id {custom_id!r} (first at {first})"
            )
            cid = None
        else:
            self._first_seen[custom_id] = line_no
        unknown = sorted(set(obj) - _LINE_KEYS)
        if unknown:
            self._error(line_no, cid, unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}")
        if obj.get("method", "POST") != "POST" or obj.get("url", "/v1/chat/completions") not in _CHAT_URLS:
            self._error(line_no, cid, "url", "only POST /v1/chat/completions requests can be batched")
        model = self._check_body(line_no, cid, obj.get("body"))
        tags = self._check_tags(line_no, cid, obj.get("metadata"))
        if cid is not None and model is not None and tags is not None and self.error_count == 0:
            self.lines.append(BatchLine(line_no, cid, model, obj["body"], tags=tags))

    def _check_tags(self, line_no: int, cid: str | None, metadata: Any) -> dict[str, str] | None:
        if metadata is not None and not isinstance(metadata, dict):
            self._error(line_no, cid, "metadata", f"metadata must be a JSON object, not {_kind(metadata)}")
            return None
        try:
            return attribution_tags(metadata, self.tag_keys)
        except TagError as exc:
            self._error(line_no, cid, exc.param, str(exc))
            return None

    def _check_body(self, line_no: int, cid: str | None, body: Any) -> str | None:
        if not isinstance(body, dict):
            message = "body is missing" if body is None else f"body must be a JSON object, not {_kind(body)}"
            self._error(line_no, cid, "body", message)
            return None
        model = body.get("model")
        ok = True
        if not isinstance(model, str) or not model:
            self._error(line_no, cid, "body.model", "body.model must name a route (a non-empty string)")
            ok = False
        elif self.config.resolve(model) is None:
            known = ", ".join(self.config.model_names())
            self._error(line_no, cid, "body.model", f"unknown route {model!r}; known: {known}")
            ok = False
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            self._error(line_no, cid, "body.messages", "body.messages must be a non-empty array")
            ok = False
        elif not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            self._error(line_no, cid, "body.messages", "every message must be an object with a role")
            ok = False
        if body.get("stream"):
            self._error(line_no, cid, "body.stream", "streaming is not available in batches")
            ok = False
        return model if ok and isinstance(model, str) else None

    def finish(self) -> list[BatchLine]:
        if self.error_count:
            self.lines.clear()  # freed here (a worker thread), not by whoever drops the error
            first = self.errors[0]
            where = self._position(first["line"])
            raise ApiError(
                400,
                "invalid_batch",
                f"{self.error_count} invalid request(s); first at {where}: {first['message']}",
                errors=self.errors,
            )
        if not self.lines:
            raise ApiError(400, "empty_batch", "the batch has no requests")
        return self.lines


def batch_tags(metadata: dict[str, Any] | None, keys: tuple[str, ...]) -> dict[str, str]:
    """A batch's attribution tags from its metadata; a bad value refuses the batch (400)."""
    try:
        return attribution_tags(metadata, keys)
    except TagError as exc:
        raise ApiError(400, "invalid_request", str(exc), param=exc.param) from None


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


class LineSplitter:
    """Splits a byte stream into numbered lines as chunks arrive, without holding the whole upload.

    Linear in the input: each chunk is split once, and an unfinished line is kept as a list of
    pieces joined once, when its newline comes. (Joining the tail to every new chunk made a long
    line quadratic: 32 MiB without a newline held the event loop 7 s.) A line longer than
    ``max_line_bytes`` is refused as soon as it is, not when it ends.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._pieces: list[bytes] = []
        self._pending = 0
        self._line_no = 0

    def _append(self, piece: bytes) -> None:
        self._pending += len(piece)
        if self._pending > self.max_line_bytes:
            line_no = self._line_no + 1
            message = f"line {line_no} is longer than {self.max_line_bytes} bytes"
            error = {"line": line_no, "custom_id": None, "param": None, "message": message}
            raise ApiError(413, "line_too_large", message, errors=[error])
        if piece:
            self._pieces.append(piece)

    def _end_line(self) -> tuple[int, bytes]:
        raw = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
        self._pieces, self._pending = [], 0
        self._line_no += 1
        return self._line_no, raw

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        *complete, rest = chunk.split(b"\n")
        lines = []
        for piece in complete:
            self._append(piece)
            lines.append(self._end_line())
        self._append(rest)
        return lines

    def close(self) -> list[tuple[int, bytes]]:
        return [self._end_line()] if self._pieces else []


async def lines_from_stream(
    chunks: AsyncIterator[bytes], validator: BatchValidator, *, max_bytes: int, max_line_bytes: int
) -> list[BatchLine]:
    """Read a JSONL upload: split on the event loop as bytes arrive (cheap), parse and check the
    lines in a worker thread a slice at a time, so the loop keeps serving other requests."""
    splitter = LineSplitter(max_line_bytes)
    size, pending, pending_bytes = 0, [], 0
    async for chunk in chunks:
        enforce_bound()
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "batch_too_large", f"the upload is larger than {max_bytes} bytes")
        for line in splitter.feed(chunk):
            pending.append(line)
            pending_bytes += len(line[1])
        if pending_bytes >= CHECK_SLICE_BYTES or len(pending) >= CHECK_SLICE_LINES:
            await run_in_threadpool(validator.add_json_lines, pending)
            pending, pending_bytes = [], 0
    pending.extend(splitter.close())
    await run_in_threadpool(validator.add_json_lines, pending)
    return await run_in_threadpool(validator.finish)


def release(lines: list[BatchLine]) -> None:
    """Drop a big batch's lines in the calling (worker) thread: freeing 50,000 of them takes tens
    of milliseconds, which the event loop should not spend."""
    lines.clear()
