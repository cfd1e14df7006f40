"""One model call, top to bottom: authenticate, parse, admit, wait, decide the outcome, settle.

A streamed call (``stream: true``) goes the same way up to its outcome: admission, rate limits,
faults and directives answer with their error status before any event is sent. Only its wait is
cut in two: ``first_chunk_share`` of the latency before the outcome (the time to first chunk), the
rest spread between the chunks (``headrace.simulator.streams``). Its tokens are settled when the
stream starts, as for an unstreamed answer; its stats record is written when the stream ends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from headrace.simulator.answers import Answer, build_answer
from headrace.simulator.buckets import BucketScope, Grant, Limiter, Rules
from headrace.simulator.config import SimConfig
from headrace.simulator.dialect import CallSpec, Dialect, SimError
from headrace.simulator.faults import DirectiveError, Directives, FaultDice, parse_directives
from headrace.simulator.prompt_cache import PromptCache
from headrace.simulator.stats import CallRecord, Stats

logger = logging.getLogger(__name__)

CLIENT_CLOSED_STATUS = 499  # nginx's convention, used only in stats: nobody receives it


class SimState:
    """Everything that changes while the simulator runs."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.limiter = Limiter()
        self.stats = Stats()
        self.dice = FaultDice(config.seed)
        self.prompt_cache = PromptCache(config.prompt_cache_entries)

    def reconfigure(self, patch: dict[str, Any]) -> SimConfig:
        config = SimConfig.model_validate({**self.config.model_dump(), **patch})
        if config.seed != self.config.seed:
            self.dice = FaultDice(config.seed)
        self.config = config
        self.prompt_cache.max_entries = config.prompt_cache_entries
        return config

    def reset(self) -> None:
        self.limiter.clear()
        self.stats = Stats()
        self.dice = FaultDice(self.config.seed)
        self.prompt_cache.clear()


def limiter_rules(config: SimConfig) -> Rules:
    return Rules(config.limiter, config.window_s, config.sub_window_s)


class ClientGone(Exception):
    pass


@dataclass
class _Trace:
    """What the stats record says about a call, filled in as the call goes."""

    t: float
    api_key: str = ""
    model: str | None = None
    outcome: str = "invalid"
    admitted: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    reserved_tokens: int = 0
    cache_read_tokens: int = 0  # of input_tokens, read from the prompt cache
    attempt: str | None = None
    credential: str = ""  # the Authorization or x-api-key header as sent (echoed by echo_in_errors)
    text: str = ""  # the last user message (echoed by echo_in_errors)
    sends: list[str] | None = None  # a streamed answer's sends (None: answered in one body)
    stream_gap_s: float = 0.0  # the wait before each send after the first
    stream_break: int | None = None  # drop the connection after this many sends

    def scope(self, dialect: str) -> BucketScope | None:
        return None if self.model is None else (dialect, self.api_key, self.model)


async def handle_call(dialect: Dialect, state: SimState, request: Request) -> Response:
    started = time.monotonic()
    request_id = dialect.new_request_id()
    stats = state.stats  # a reset mid-call must not mix this call into the fresh counters
    stats.receive(dialect.name)
    trace = _Trace(t=time.time(), attempt=request.headers.get("x-headrace-attempt"))
    trace.credential = request.headers.get("authorization") or request.headers.get("x-api-key") or ""
    status, extra_headers = 200, {}
    try:
        body = await _serve(dialect, state, stats, request, trace)
    except SimError as error:
        if state.config.echo_in_errors:
            # As a provider's "Incorrect API key provided: ..." does: the header, and the key alone.
            key = trace.credential.removeprefix("Bearer ").removeprefix("bearer ")
            error.message = f"{error.message} You sent {trace.text!r} with {trace.credential!r} (key {key})."
        status, body, extra_headers = error.status, dialect.error_body(error, request_id), error.headers
    except ClientGone:
        trace.outcome = "client_closed"
        status, body = CLIENT_CLOSED_STATUS, {}
    except Exception:
        # A simulator bug must still answer in the provider's shape, never as a bare traceback.
        logger.exception("simulator failed on request %s", request_id)
        trace.outcome = "crash"
        crash = dialect.status_error(500, trace.model)
        status, body = 500, dialect.error_body(crash, request_id)
    headers = dialect.response_headers(request_id, round((time.monotonic() - started) * 1000))
    scope = trace.scope(dialect.name)
    if scope is not None:
        states = state.limiter.states(
            scope, dialect.limits(state.config), time.monotonic(), limiter_rules(state.config)
        )
        headers.update(dialect.limit_headers(states))
    headers.update(extra_headers)
    if status == 200 and trace.sends is not None:
        events = _paced(dialect.name, stats, trace, trace.sends)
        return StreamingResponse(events, headers=headers, media_type="text/event-stream")
    stats.finish(_record(dialect.name, trace, status))
    return JSONResponse(body, status_code=status, headers=headers)


class StreamBroken(Exception):
    """A stream_break directive: the connection drops mid-stream (the ASGI server closes it)."""


async def _paced(dialect: str, stats: Stats, trace: _Trace, sends: list[str]) -> AsyncIterator[str]:
    status = CLIENT_CLOSED_STATUS  # unless the stream runs to its end
    try:
        for index, send in enumerate(sends):
            if trace.stream_break is not None and index >= trace.stream_break:
                trace.outcome, status = "stream_broken", 200
                raise StreamBroken(f"stream_break={trace.stream_break}")
            if index:
                await asyncio.sleep(trace.stream_gap_s)
            yield send
        status = 200
    finally:
        if status == CLIENT_CLOSED_STATUS:
            trace.outcome = "client_closed"
        stats.finish(_record(dialect, trace, status))


async def _serve(
    dialect: Dialect, state: SimState, stats: Stats, request: Request, trace: _Trace
) -> dict[str, Any]:
    config = state.config
    trace.api_key = dialect.authenticate(request.headers, config.require_api_key)
    spec = dialect.parse(await _read_json(dialect, request))
    trace.model, trace.input_tokens = spec.model, spec.prompt_tokens
    trace.text = spec.last_user_text
    try:
        directives = parse_directives(spec.last_user_text)
    except DirectiveError as error:
        raise dialect.invalid(str(error)) from None
    answer = build_answer(
        seed=config.seed,
        model=spec.model,
        prompt=spec.prompt,
        min_tokens=config.min_output_tokens,
        max_tokens=config.max_output_tokens,
        forced_tokens=directives.output_tokens,
        cap_tokens=spec.max_tokens,
        stops=spec.stops,
    )
    # Without max_tokens the admission charge is the answer's real length (known up front here);
    # so it is on an OTPM told to count only the output really produced.
    counts_output = dialect.output_bucket == "output_tokens" and config.otpm_counts == "output"
    reserve = answer.output_tokens if spec.max_tokens is None or counts_output else spec.max_tokens
    scope = (dialect.name, trace.api_key, spec.model)
    rules = limiter_rules(config)
    verdict = state.limiter.admit(
        scope, dialect.charges(spec, reserve), dialect.limits(config), time.monotonic(), rules
    )
    trace.t = time.time()
    if not isinstance(verdict, Grant):
        trace.outcome = "rate_limited"
        raise dialect.rate_limited(verdict, spec.model)
    trace.admitted, trace.reserved_tokens = True, reserve
    stats.admit(dialect.name, spec.prompt_tokens, reserve)
    try:
        return await _answer(dialect, state, request, spec, answer, directives, trace)
    finally:
        # Settle the output reservation to what was actually produced (nothing, on any error).
        unused = reserve - trace.output_tokens
        state.limiter.refund(verdict, dialect.output_bucket, unused, time.monotonic())
        if dialect.cache_free_bucket is not None:  # Anthropic's ITPM does not count cache reads
            state.limiter.refund(
                verdict, dialect.cache_free_bucket, trace.cache_read_tokens, time.monotonic()
            )


async def _answer(
    dialect: Dialect,
    state: SimState,
    request: Request,
    spec: CallSpec,
    answer: Answer,
    directives: Directives,
    trace: _Trace,
) -> dict[str, Any]:
    config = state.config
    # A directive decides the outcome by itself and must not consume a fault roll, so the
    # fault sequence of the other calls stays the same.
    fault = None if directives.forces_outcome else state.dice.roll(config.fault_rate, config.faults)
    trace.outcome = "directive" if directives.forces_outcome else "fault" if fault else "ok"
    if directives.hang or fault == "hang":
        await _pause(request, config.hang_s if directives.hang_s is None else directives.hang_s)
        raise dialect.status_error(504, spec.model)
    if directives.latency_ms is not None:
        latency_s = directives.latency_ms / 1000
    else:
        latency_s = state.dice.latency_s(config.latency_ms, config.latency_jitter_ms)
    if spec.stream:
        first_s = latency_s * config.first_chunk_share
        await _pause(request, first_s)
        rest_s = latency_s - first_s
    else:
        await _pause(request, latency_s)
    if directives.context_length:
        raise dialect.context_length_error(spec)
    if directives.status is not None:
        error = dialect.status_error(directives.status, spec.model)
        if directives.retry_after_s is not None:
            error.headers.update(dialect.retry_headers(directives.retry_after_s))
        if directives.retry_after_raw is not None:
            error.headers["retry-after"] = directives.retry_after_raw
        raise error
    if fault is not None:
        raise dialect.status_error(int(fault), spec.model)
    trace.output_tokens = answer.output_tokens
    cache = dialect.cache_use(state.prompt_cache, trace.scope(dialect.name), spec, config)
    spec = replace(spec, cache=cache)
    trace.cache_read_tokens = cache.read_tokens
    body = dialect.success_body(spec, answer)
    if spec.stream:
        trace.sends = dialect.stream_chunks(spec, body)
        trace.stream_gap_s = rest_s / max(len(trace.sends) - 1, 1)
        trace.stream_break = directives.stream_break
    return body


async def _read_json(dialect: Dialect, request: Request) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone from None
    try:
        return json.loads(raw)
    except ValueError:
        raise dialect.invalid("The request body is not valid JSON.") from None


async def _pause(request: Request, seconds: float) -> None:
    """Sleep without blocking other calls; stop early if the client disconnects."""
    if seconds <= 0:
        return
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()
    if done:
        raise ClientGone


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the server's next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _record(dialect: str, trace: _Trace, status: int) -> CallRecord:
    return CallRecord(
        t=trace.t,
        t_done=time.time(),
        dialect=dialect,
        model=trace.model,
        api_key=trace.api_key,
        status=status,
        outcome=trace.outcome,
        admitted=trace.admitted,
        input_tokens=trace.input_tokens,
        output_tokens=trace.output_tokens,
        reserved_tokens=trace.reserved_tokens,
        attempt=trace.attempt,
        cache_read_tokens=trace.cache_read_tokens,
    )
