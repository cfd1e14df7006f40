"""One request, top to bottom: lease it, walk its route's chain, reserve, call, record, decide.

After a call the ledger write comes first: the call was paid for, so its attempt row (usage, cost,
outcome) is written before anything else and held through a ledger outage. Everything after it
that touches Redis (bucket settlement, breaker, counters) is best-effort and can never lose it.

Every way out leaves the request ended, or in a state a sweep picks up: parked in the delay
queue, handed back to the outbox, or RUNNING under a lease that is released on the way out (the
recovery sweep requeues a running request whose lease is gone).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import redis
from kombu.exceptions import KombuError as BrokerError

from broker_config.deployments import Deployment, DeploymentsConfig, Route
from broker_config.settings import Settings
from db.engine import Database
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger
from workers.admission import (
    DEFAULT_PAUSE_S,
    MAX_PAUSE_S,
    Bucket,
    Estimate,
    Ticket,
    TooLarge,
    Wait,
    admit,
    estimate_call,
    requested_max_tokens,
    settle,
    settlement,
)
from workers.breaker import Breaker, FallbackCounter, Permit, is_provider_failure
from workers.costing import call_cost_usd
from workers.delays import DelayQueue
from workers.leases import Lease, Leases
from workers.policy import FAIL, FALL_BACK, RETRY, Decision, backoff_s, decide
from workers.providers.base import CallFailed, ProviderAdapter, ProviderCall, ProviderReply, Usage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deps:
    """Everything a run needs; tests build their own."""

    db: Database
    config: DeploymentsConfig
    settings: Settings
    adapters: Mapping[str, ProviderAdapter]
    bucket: Bucket
    delays: DelayQueue
    breaker: Breaker
    leases: Leases
    fallbacks: FallbackCounter
    worker: str  # this process's name on the attempts it makes
    sleep: Callable[[float], None] = field(default=time.sleep)


@dataclass
class Walk:
    """One run's walk down its route's chain, and what it has learned so far."""

    run: ledger.RunStart
    lease: Lease
    route: Route
    deadline: datetime  # no call starts after this: the batch's window, or the route's deadline
    over: bool = False  # the request ended, or this run no longer owns it: stop here
    failures: list[dict[str, Any]] = field(default_factory=list)
    soonest_room_s: float | None = None  # the shortest wait a busy deployment asked for
    attempts: int = 0  # the request's attempts so far, all runs included

    def busy(self, wait: Wait) -> None:
        if self.soonest_room_s is None or wait.seconds < self.soonest_room_s:
            self.soonest_room_s = wait.seconds


def run_request(request_id: str, deps: Deps) -> None:
    """Run one request to its end, or park it until a deployment has room. Safe to call again: a
    delivery of a request whose run is alive elsewhere does nothing. Never raises."""
    try:
        lease = deps.leases.acquire(request_id)
    except redis.RedisError as exc:
        log.warning("request %s handed back: Redis unreachable (%s)", request_id, exc)
        _hand_back(deps, request_id, None, clean=True)
        return
    if lease is None:
        log.info("request %s is running elsewhere; this delivery is a duplicate", request_id)
        return
    try:
        run = ledger.begin_run(deps.db, request_id, lease.token, recovery_claim(deps))
        if run is not None:
            _walk_chain(run, lease, deps)
    except (redis.RedisError, BrokerError) as exc:
        # Redis went away mid-run: the outbox's publisher sweep sends it again once it is back.
        log.warning("request %s handed back: Redis unreachable (%s)", request_id, exc)
        _hand_back(deps, request_id, lease.token, clean=True)
    except Exception:
        log.exception("request %s: its run failed; handing it back", request_id)
        _hand_back(deps, request_id, lease.token, clean=False)
    finally:
        deps.leases.release(lease)


def _hand_back(deps: Deps, request_id: str, token: str | None, *, clean: bool) -> None:
    """Back to the outbox. If even that fails (the ledger is down), the request stays RUNNING
    under a lease released on the way out, or QUEUED with no message: the recovery and
    lost-message sweeps find it once the ledger is back."""
    try:
        if not ledger.hand_back(deps.db, request_id, token, clean=clean) and token is not None:
            ledger.hand_back(deps.db, request_id, None, clean=clean)  # begin_run never committed
    except Exception as exc:
        log.warning("request %s left for the sweeps: %s", request_id, type(exc).__name__)


def recovery_claim(deps: Deps) -> ledger.Claim:
    return ledger.Claim(
        estimate_lost=partial(_estimate_lost_call, deps.config, deps.settings.default_max_tokens),
        max_deliveries=deps.settings.max_deliveries,
    )


def _walk_chain(run: ledger.RunStart, lease: Lease, deps: Deps) -> None:
    route = deps.config.resolve(run.model)
    if route is None:
        message = f"no route or deployment serves model {run.model!r} any more"
        _end(deps, run, lease, RequestStatus.FAILED, {"kind": "config", "message": message})
        return
    walk = Walk(run, lease, route, deadline=_deadline(run, route))
    for position, name in enumerate(route.deployments):
        if position:
            _best_effort("fallback count", deps.fallbacks.activated, route.name, name)
        _try_deployment(walk, deps.config.deployment(name), deps)
        if walk.over:
            return
    budget = route.max_attempts_per_request or deps.settings.max_attempts_per_request
    if walk.soonest_room_s is not None and walk.attempts < budget:
        # Every deployment that could take it is full for now: wait in the delay queue, not in a
        # slot. Parked first, then handed back, so it is never QUEUED with no message anywhere.
        deps.delays.park(run.request_id, run.priority, walk.soonest_room_s)
        ledger.defer_run(deps.db, run.request_id, lease.token)
        return
    message = f"every deployment of route {route.name!r} failed"
    _end(
        deps,
        run,
        lease,
        RequestStatus.FAILED,
        {"kind": "exhausted", "message": message, "deployments": walk.failures},
        deployment=walk.failures[-1]["deployment"] if walk.failures else None,
    )


def _end(
    deps: Deps,
    run: ledger.RunStart,
    lease: Lease,
    status: RequestStatus,
    error: dict[str, Any],
    deployment: str | None = None,
) -> None:
    end = ledger.RequestEnd(status, error=error, deployment=deployment)
    ledger.end_run(deps.db, run.request_id, lease.token, end)


def _deadline(run: ledger.RunStart, route: Route) -> datetime:
    if route.deadline_s is None:
        return run.expires_at
    return min(run.expires_at, run.created_at + timedelta(seconds=route.deadline_s))


def longest_call_s(config: DeploymentsConfig, settings: Settings) -> float:
    """The longest one provider call may take, connect and read timeouts included."""
    return max(
        (d.timeout_s or settings.call_timeout_s) + (d.connect_timeout_s or settings.connect_timeout_s)
        for d in config.deployments
    )


def longest_run_s(config: DeploymentsConfig, settings: Settings) -> float:
    """A bound on how long one delivery of a request may hold its message before acknowledging
    it: every attempt on every deployment of the longest chain, with its waits and backoffs, and
    one ledger outage held through."""
    chain = max((len(r.deployments) for r in config.routes), default=1)
    attempts = max(
        [r.max_attempts_per_deployment or settings.max_attempts_per_deployment for r in config.routes]
        + [settings.max_attempts_per_deployment]
    )
    per_attempt = (
        longest_call_s(config, settings)
        + 2 * settings.bucket_max_inline_wait_s
        + max(settings.backoff_max_s, settings.max_inline_wait_s)
    )
    return chain * attempts * per_attempt + settings.ledger_hold_s


def _try_deployment(walk: Walk, deployment: Deployment, deps: Deps) -> None:
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
        _end(deps, walk.run, walk.lease, RequestStatus.EXPIRED, {"kind": "expired", "message": message})
        walk.over = True
        return None
    permit = deps.breaker.allow(deployment.name)
    if not permit.allowed:
        walk.busy(Wait(permit.wait_s, "circuit_open"))  # an open breaker: do not wait, go on
        return None
    ticket = _reserve(walk, deployment, estimate, deps)
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
    started = time.monotonic()
    # A call never outlives the request's deadline.
    timed = replace(
        call,
        timeout_s=max(0.1, min(call.timeout_s, left_s)),
        attempt_id=f"{walk.run.request_id}:{attempt_no}",
    )
    outcome = call_provider(deps.adapters[deployment.provider], timed)
    latency_ms = round((time.monotonic() - started) * 1000)
    decision = _record(walk, deployment, attempt_no, outcome, latency_ms, deps)  # first, and held
    _after_call(deps, ticket, estimate, outcome, permit, f"{walk.run.request_id}:{attempt_no}")
    if decision is None or walk.over:
        return None
    assert isinstance(outcome, CallFailed)
    return outcome, decision


def _reserve(walk: Walk, deployment: Deployment, estimate: Estimate, deps: Deps) -> Ticket | None:
    """Room in the deployment's bucket, or None (the chain goes on: it is busy, or too small)."""
    ticket = admit(
        deps.bucket,
        deployment,
        estimate,
        request_id=walk.run.request_id,
        priority=walk.run.priority,
        tenant=deps.config.tenant_limits(walk.run.tenant),
        max_inline_wait_s=deps.settings.bucket_max_inline_wait_s,
        sleep=deps.sleep,
    )
    if isinstance(ticket, Wait):
        walk.busy(ticket)
        return None
    if isinstance(ticket, TooLarge):
        walk.failures.append({"kind": "too_large", "deployment": deployment.name, "message": ticket.message})
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


def outcome_error(outcome: CallFailed, deployment: Deployment, attempt_no: int) -> dict[str, Any]:
    return {**outcome.as_error(), "deployment": deployment.name, "attempt": attempt_no}


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
        result = ledger.AttemptResult(
            AttemptOutcome.SUCCESS,
            latency_ms,
            http_status=outcome.http_status,
            usage=outcome.usage,
            cost_usd=call_cost_usd(deployment, outcome.usage),
            provider_request_id=outcome.provider_request_id,
        )
        end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response=outcome.body, deployment=deployment.name)
        ledger.finish_attempt(deps.db, walk.run.request_id, walk.lease.token, attempt_no, result, end)
        walk.over = True
        return None
    decision = decide(outcome)
    error = outcome_error(outcome, deployment, attempt_no)
    result = ledger.AttemptResult(
        decision,
        latency_ms,
        http_status=outcome.status,
        error=error,
        provider_request_id=outcome.provider_request_id,
    )
    log.info(
        "request %s attempt %d on %s: %s -> %s",
        walk.run.request_id,
        attempt_no,
        deployment.name,
        outcome.message[:200],
        decision,
    )
    ends = ledger.RequestEnd(RequestStatus.FAILED, error=error, deployment=deployment.name)
    fails = decision is FAIL
    owned = ledger.finish_attempt(
        deps.db, walk.run.request_id, walk.lease.token, attempt_no, result, ends if fails else None
    )
    walk.over = fails or not owned
    return decision


def _after_call(
    deps: Deps,
    ticket: Ticket,
    estimate: Estimate,
    outcome: ProviderReply | CallFailed,
    permit: Permit,
    call_id: str,
) -> None:
    """Tell Redis how the call went: best-effort, after the ledger has the call."""
    deployment = ticket.deployment
    settle(deps.bucket, ticket, settlement(deployment, estimate, outcome))
    _best_effort(
        "breaker",
        deps.breaker.record,
        deployment.name,
        call_id,
        failed=is_provider_failure(outcome),
        probe=permit.probe,
    )


def _best_effort(what: str, fn: Callable[..., object], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except redis.RedisError as exc:
        log.warning("%s not updated: Redis unreachable (%s)", what, exc)


def call_provider(adapter: ProviderAdapter, call: ProviderCall) -> ProviderReply | CallFailed:
    """The call, with every failure turned into a ``CallFailed``: never raises."""
    try:
        return adapter.complete(call)
    except CallFailed as failure:
        return failure
    except Exception as exc:  # an adapter bug must not lose the request or its attempt row
        log.exception("adapter %s raised %s", adapter.name, type(exc).__name__)
        return CallFailed(f"{type(exc).__name__}: {exc}", kind="invalid_reply")


def _estimate_lost_call(
    config: DeploymentsConfig,
    default_max_tokens: int,
    deployment: str,
    input_tokens: int,
    body: dict[str, Any],
) -> tuple[int, Decimal | None]:
    """A call whose run died: the output admission reserved for it (max_tokens x n, the
    deployment's own cap when the request gives none), and what that would cost."""
    try:
        dep = config.deployment(deployment)
    except KeyError:
        return requested_max_tokens(body, default_max_tokens), None
    output_tokens = estimate_call(dep, body, default_max_tokens).output_tokens
    return output_tokens, call_cost_usd(dep, Usage(input_tokens, output_tokens))
