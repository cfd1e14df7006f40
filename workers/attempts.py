"""Attempts on one deployment of a route's chain, one call at a time: reserve room in its bucket,
write the attempt row, call, record the call in the ledger first, then tell Redis (best-effort).

What a run carries (``Deps``, ``Walk``) is ``workers/run_deps.py``; ``workers.pipeline`` walks the
chain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis
import structlog

from broker_config.deployments import Deployment
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger, observe, spans
from workers.admission import (
    DEFAULT_PAUSE_S,
    MAX_PAUSE_S,
    Estimate,
    Ticket,
    TooLarge,
    Wait,
    admit,
    estimate_call,
    settle,
    settlement,
)
from workers.breaker import is_provider_failure
from workers.costing import call_cost_usd
from workers.leases import Lease
from workers.policy import FAIL, FALL_BACK, RETRY, Decision, backoff_s, decide, outcome_error
from workers.providers.anthropic_parts import dropped_for_openai
from workers.providers.base import CallFailed, ProviderCall, ProviderReply, call_provider
from workers.run_deps import Deps, Walk

log = structlog.get_logger(__name__)


def end_without_call(
    deps: Deps,
    run: ledger.RunStart,
    lease: Lease,
    status: RequestStatus,
    error: dict[str, Any],
    deployment: str | None = None,
) -> None:
    end = ledger.RequestEnd(status, error=error, deployment=deployment)
    ledger.end_run(deps.db, run.request_id, lease.token, end)
    observe.request_ended(run.model, run.priority, status.value)


def try_deployment(walk: Walk, deployment: Deployment, deps: Deps) -> None:
    """Attempts on one deployment until it answers, the request ends, or the chain must go on."""
    settings = deps.settings
    max_attempts = walk.route.max_attempts_per_deployment or settings.max_attempts_per_deployment
    call = ProviderCall(
        deployment=deployment,
        body=walk.run.body,
        timeout_s=deployment.timeout_s or settings.call_timeout_s,
        connect_timeout_s=deployment.connect_timeout_s or settings.connect_timeout_s,
        default_max_tokens=deployment.max_output_tokens or settings.default_max_tokens,
    )
    estimate = estimate_call(deployment, walk.run.body, settings.default_max_tokens)
    for retry_no in range(max_attempts):
        failed = _attempt(walk, call, estimate, deps)
        structlog.contextvars.unbind_contextvars("deployment", "attempt")
        if failed is None:
            return
        failure, decision = failed
        delay = _retry_delay(
            walk, deployment, failure, decision, retry_no, final=retry_no + 1 == max_attempts, deps=deps
        )
        if delay is None:
            return
        deps.sleep(delay)


def _attempt(
    walk: Walk, call: ProviderCall, estimate: Estimate, deps: Deps
) -> tuple[CallFailed, Decision] | None:
    """One call, if one may be made now: reserve room, write the attempt row, call, record.
    Returns the failure and the policy's decision when the call failed and the request goes on
    (``walk.over`` tells a stop from a move down the chain when it returns None)."""
    deployment = call.deployment
    left_s = (walk.deadline - utcnow()).total_seconds()
    if left_s <= 0:
        message = (
            "its deadline passed" if walk.deadline < walk.run.expires_at else "the batch's window passed"
        )
        expired = {"kind": "expired", "message": message, "deployments": walk.last_errors()}
        end_without_call(deps, walk.run, walk.lease, RequestStatus.EXPIRED, expired)
        walk.over = True
        return None
    ticket = _reserve(walk, deployment, estimate, deps)  # asks the deployment's breaker too
    if ticket is None:
        return None
    attempt_no = None
    if not walk.lease.lost:
        attempt_no = ledger.begin_attempt(
            deps.db,
            walk.run.request_id,
            walk.lease.token,
            deployment=deployment.name,
            provider=deployment.provider,
            model=deployment.model,
            estimated_input_tokens=estimate.prompt_tokens,
            worker=deps.worker,
        )
    if attempt_no is None:  # the request ended elsewhere, was cancelled, or is no longer ours
        settle(
            deps.bucket,
            ticket,
            settlement(deployment, estimate, CallFailed("not called", kind="unavailable")),
        )
        walk.over = True
        return None
    walk.attempts = attempt_no
    structlog.contextvars.bind_contextvars(deployment=deployment.name, attempt=attempt_no)
    started = time.monotonic()
    # A call never outlives the request's deadline.
    timed = replace(
        call,
        timeout_s=max(0.1, min(call.timeout_s, left_s)),
        attempt_id=f"{walk.run.request_id}:{attempt_no}",
    )
    span = spans.call_started(deployment, attempt_no)  # None unless traces are on
    observe.call_started(deployment.name)
    try:
        outcome = call_provider(deps.adapters[deployment.provider], timed)
    finally:
        observe.call_ended(deployment.name)
    answered = time.monotonic()
    spans.call_ended(span, outcome)
    observe.call(deployment, outcome, answered - started)
    latency_ms = round((answered - started) * 1000)
    decision = _record(walk, deployment, attempt_no, outcome, latency_ms, deps)  # first, and held
    _after_call(deps, ticket, estimate, outcome, f"{walk.run.request_id}:{attempt_no}", answered)
    if decision is None or walk.over:
        return None
    assert isinstance(outcome, CallFailed)
    return outcome, decision


def _reserve(walk: Walk, deployment: Deployment, estimate: Estimate, deps: Deps) -> Ticket | None:
    """Room in the deployment's bucket, or None (the chain goes on: it is busy, its breaker is
    open, or it is too small)."""
    asked = time.monotonic()
    ticket = admit(
        deps.bucket,
        deployment,
        estimate,
        request_id=walk.run.request_id,
        priority=walk.run.priority,
        tenant=deps.config.tenant_limits(walk.run.tenant),
        max_inline_wait_s=deps.settings.bucket_max_inline_wait_s,
        sleep=deps.sleep,
        line=deps.line,
        budgets=walk.budgets(deployment, estimate),
    )
    observe.waited_for_room(deployment.name, time.monotonic() - asked)
    if isinstance(ticket, Wait):
        walk.held_by_budget = ticket.reason.startswith("budget:")
        walk.busy(ticket, deployment.name)
        return None
    if isinstance(ticket, TooLarge):
        too_large = {
            "kind": "too_large",
            "deployment": deployment.name,
            "message": ticket.message,
            "passes": False,
        }
        walk.failures.append(too_large)
        return None
    return ticket


def _retry_delay(
    walk: Walk,
    deployment: Deployment,
    failure: CallFailed,
    decision: Decision,
    retry_no: int,
    *,
    final: bool,
    deps: Deps,
) -> float | None:
    """How long to wait before the same deployment is tried again; None: go down the chain."""
    error = outcome_error(failure, deployment, walk.attempts)
    if failure.status == 429 and decision is RETRY:
        # The bucket now holds every worker back for the provider's retry-after: this request
        # moves down the chain, or waits in the delay queue, rather than spend its attempts.
        walk.busy(Wait(min(failure.retry_after_s or DEFAULT_PAUSE_S, MAX_PAUSE_S), "rate_limited"))
        walk.failures.append(error)
        return None
    if decision is FALL_BACK or final:
        walk.failures.append(error)
        return None
    settings = deps.settings
    delay = backoff_s(
        retry_no,
        base_s=settings.backoff_base_s,
        max_s=settings.backoff_max_s,
        retry_after_s=failure.retry_after_s,
    )
    if delay > settings.max_inline_wait_s:
        # Holding a worker slot this long starves every other request; let the chain go on.
        walk.failures.append({**error, "message": f"{error['message']} (asked to wait {delay:.0f}s)"})
        return None
    return delay


def _record(
    walk: Walk,
    deployment: Deployment,
    attempt_no: int,
    outcome: ProviderReply | CallFailed,
    latency_ms: int,
    deps: Deps,
) -> Decision | None:
    """Write the attempt (and, when it decides the request, its end). The policy's decision for a
    failed call; None for an answer. Sets ``walk.over`` when the request ended or is not ours."""
    if isinstance(outcome, ProviderReply):
        # Streamed calls: time to first chunk, and generation = the rest of the latency.
        first_s = outcome.first_chunk_s
        first_ms = None if first_s is None else min(round(first_s * 1000), latency_ms)
        result = ledger.AttemptResult(
            AttemptOutcome.SUCCESS,
            latency_ms,
            http_status=outcome.http_status,
            usage=outcome.usage,
            cost_usd=call_cost_usd(deployment, outcome.usage),
            provider_request_id=outcome.provider_request_id,
            first_chunk_ms=first_ms,
            generation_ms=None if first_ms is None else latency_ms - first_ms,
        )
        dropped = dropped_for_openai(deployment.provider, walk.run.body)  # the parts it was not sent
        end = ledger.RequestEnd(
            RequestStatus.SUCCEEDED, response=outcome.body, deployment=deployment.name, notes=dropped
        )
        owned = ledger.finish_attempt(deps.db, walk.run.request_id, walk.lease.token, attempt_no, result, end)
        _observe_attempt(walk, deployment, result, ended=RequestStatus.SUCCEEDED if owned else None)
        walk.answered = (outcome, deployment, result.cost_usd) if owned else None
        walk.over = True
        return None
    decision = decide(outcome)
    error = outcome_error(outcome, deployment, attempt_no)
    if error["may_have_billed"]:
        walk.billed += 1
    result = ledger.AttemptResult(
        decision,
        latency_ms,
        http_status=outcome.status,
        error=error,
        provider_request_id=outcome.provider_request_id,
    )
    # The facts of the failure, not the provider's text: an error body may echo the prompt or the key.
    log.info(
        "call failed",
        kind=outcome.kind,
        status=outcome.status,
        error_type=outcome.error_type,
        error_code=outcome.error_code,
        decision=decision.value,
        **({"message": outcome.message} if deps.settings.log_content else {}),  # cut once scrubbed
    )
    ends = ledger.RequestEnd(RequestStatus.FAILED, error=error, deployment=deployment.name)
    fails = decision is FAIL
    owned = ledger.finish_attempt(
        deps.db, walk.run.request_id, walk.lease.token, attempt_no, result, ends if fails else None
    )
    _observe_attempt(walk, deployment, result, ended=RequestStatus.FAILED if fails and owned else None)
    walk.over = fails or not owned
    return decision


def _observe_attempt(
    walk: Walk, deployment: Deployment, result: ledger.AttemptResult, ended: RequestStatus | None
) -> None:
    """The attempt the ledger has just recorded (and the request's end, when it ended it)."""
    run = walk.run
    observe.attempt(deployment.name, result.outcome.value)
    if result.usage is not None:
        spent = observe.Spent(
            run.tenant, walk.route.name, deployment.name, run.tags, result.usage, result.cost_usd
        )
        observe.spent([spent])
    if ended is not None:
        observe.request_ended(walk.route.name, run.priority, ended.value)


def _after_call(
    deps: Deps,
    ticket: Ticket,
    estimate: Estimate,
    outcome: ProviderReply | CallFailed,
    call_id: str,
    answered: float,
) -> None:
    """Tell Redis how the call went, the bucket and the breaker in one step: best-effort, after the
    ledger has the call (``answered``: the monotonic time the provider's answer came, which its
    durations count from)."""
    deployment = ticket.deployment
    if isinstance(outcome, ProviderReply):
        # What admission really held: a learned output reservation holds less than the cap.
        held = sum(c.cost for c in ticket.charges if c.name != "requests")
        observe.reservation(deployment.name, round(held), outcome.usage)
    age_s = time.monotonic() - answered
    settled = settle(
        deps.bucket,
        ticket,
        settlement(deployment, estimate, outcome, age_s=age_s),
        call_id=call_id,
        failed=is_provider_failure(outcome),
        # What it spent from its budgets: its price when it answered, as its ledger row says.
        cost_usd=call_cost_usd(deployment, outcome.usage)
        if ticket.budgets and isinstance(outcome, ProviderReply)
        else None,
    )
    if settled.transition == "closed":
        best_effort("breaker waiters", _wake, deps, deployment.name)


def _wake(deps: Deps, deployment: str) -> None:
    woken = deps.delays.wake(deployment)
    log.info("parked requests released: the breaker closed", released=woken, deployment=deployment)


def best_effort(what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except redis.RedisError as exc:
        log.warning("not updated: Redis unreachable", what=what, error=str(exc))
