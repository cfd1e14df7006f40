"""One request, top to bottom: claim it, walk its route's chain, reserve, call, classify, record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from functools import partial
from typing import Any

from broker_config.deployments import Deployment, DeploymentsConfig, Route
from broker_config.settings import Settings
from db.engine import Database
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger
from workers.accounting import DEFAULT_PAUSE_S, estimate_call, settlement
from workers.admission import TooLarge, Wait, admit, settle
from workers.breaker import Breaker, is_provider_failure
from workers.bucket import Bucket
from workers.costing import call_cost_usd
from workers.delays import DelayQueue
from workers.estimate import requested_max_tokens
from workers.fallbacks import FallbackCounter
from workers.policy import Step, backoff_s, classify
from workers.providers.base import CallFailed, ProviderAdapter, ProviderCall, ProviderReply, Usage
from workers.recovery import Heartbeats

log = logging.getLogger(__name__)

_OUTCOME_OF_STEP = {
    Step.RETRY: AttemptOutcome.RETRY,
    Step.FALL_BACK: AttemptOutcome.FALLBACK,
    Step.FAIL: AttemptOutcome.FATAL,
}


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
    heartbeats: Heartbeats
    fallbacks: FallbackCounter
    worker: str
    sleep: Callable[[float], None] = field(default=time.sleep)


class Next(Enum):
    DONE = "done"  # the request has ended (any way)
    FALL_BACK = "fall_back"  # try the next deployment of the chain


@dataclass
class Chain:
    """What the walk down a route's chain has learned so far."""

    deadline: datetime  # no call starts after this: the batch's window, or the route's deadline
    failures: list[dict[str, Any]] = field(default_factory=list)
    soonest_room_s: float | None = None  # the shortest wait a busy deployment asked for
    attempts: int = 0  # the request's attempts so far, all deliveries included

    def busy(self, wait: Wait) -> None:
        if self.soonest_room_s is None or wait.seconds < self.soonest_room_s:
            self.soonest_room_s = wait.seconds


def run_request(request_id: str, deps: Deps) -> None:
    """Run one request to its end, or park it until a deployment has room. Safe to call again."""
    claim = ledger.Claim(
        worker=deps.worker,
        owner_alive=deps.heartbeats.alive,
        # An attempt older than any call can last has lost its worker, whatever its heartbeat says.
        stale_attempt_s=longest_call_s(deps.config, deps.settings) + 60,
        estimate_lost=partial(_estimate_cost, deps.config),
        estimated_output_tokens=lambda body: requested_max_tokens(body, deps.settings.default_max_tokens),
        max_deliveries=deps.settings.max_deliveries,
    )
    run = ledger.begin_run(deps.db, request_id, claim)
    if run is None:
        return
    route = deps.config.resolve(run.model)
    if route is None:
        message = f"no route or deployment serves model {run.model!r} any more"
        _end(deps, request_id, RequestStatus.FAILED, {"kind": "config", "message": message})
        return
    chain = Chain(deadline=_deadline(run, route))
    for position, name in enumerate(route.deployments):
        if position:
            deps.fallbacks.activated(route.name, name)
        if _try_deployment(run, deps.config.deployment(name), route, deps, chain) is Next.DONE:
            return
    budget = route.max_attempts_per_request or deps.settings.max_attempts_per_request
    if chain.soonest_room_s is not None and chain.attempts < budget:
        # Every deployment that could take it is full for now: wait in the delay queue, not in a slot.
        ledger.defer_run(deps.db, request_id)
        deps.delays.park(request_id, run.priority, chain.soonest_room_s)
        return
    message = f"every deployment of route {route.name!r} failed"
    _end(
        deps,
        request_id,
        RequestStatus.FAILED,
        {"kind": "exhausted", "message": message, "deployments": chain.failures},
        deployment=chain.failures[-1]["deployment"] if chain.failures else None,
    )


def _end(
    deps: Deps, request_id: str, status: RequestStatus, error: dict[str, Any], deployment: str | None = None
) -> None:
    ledger.end_run(deps.db, request_id, ledger.RequestEnd(status, error=error, deployment=deployment))


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
    it: every attempt on every deployment of the longest chain, with its waits and backoffs."""
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
    return chain * attempts * per_attempt


def _try_deployment(
    run: ledger.RunStart, deployment: Deployment, route: Route, deps: Deps, chain: Chain
) -> Next:
    """Attempts on one deployment, each with room reserved in its bucket first."""
    settings = deps.settings
    max_attempts = route.max_attempts_per_deployment or settings.max_attempts_per_deployment
    call = ProviderCall(
        deployment=deployment,
        body=run.body,
        timeout_s=deployment.timeout_s or settings.call_timeout_s,
        connect_timeout_s=deployment.connect_timeout_s or settings.connect_timeout_s,
        default_max_tokens=deployment.max_output_tokens or settings.default_max_tokens,
    )
    estimate = estimate_call(deployment, run.body, settings.default_max_tokens)
    for retry_no in range(max_attempts):
        left_s = (chain.deadline - utcnow()).total_seconds()
        if left_s <= 0:
            message = (
                "its deadline passed" if chain.deadline < run.expires_at else "the batch's window passed"
            )
            _end(deps, run.request_id, RequestStatus.EXPIRED, {"kind": "expired", "message": message})
            return Next.DONE
        permit = deps.breaker.allow(deployment.name)
        if not permit.allowed:
            chain.busy(Wait(permit.wait_s, "circuit_open"))  # an open breaker: do not wait, go on
            return Next.FALL_BACK
        ticket = admit(
            deps.bucket,
            deployment,
            estimate,
            request_id=run.request_id,
            priority=run.priority,
            tenant=deps.config.tenant_limits(run.tenant),
            max_inline_wait_s=settings.bucket_max_inline_wait_s,
            sleep=deps.sleep,
        )
        if isinstance(ticket, Wait):
            chain.busy(ticket)
            return Next.FALL_BACK
        if isinstance(ticket, TooLarge):
            chain.failures.append(
                {"kind": "too_large", "deployment": deployment.name, "message": ticket.message}
            )
            return Next.FALL_BACK
        attempt_no = ledger.begin_attempt(
            deps.db,
            run.request_id,
            deployment=deployment.name,
            provider=deployment.provider,
            model=deployment.model,
            estimated_input_tokens=estimate.prompt_tokens,
            worker=deps.worker,
        )
        chain.attempts = attempt_no or chain.attempts
        if attempt_no is None:  # ended elsewhere (cancelled, or a duplicate delivery finished it)
            settle(
                deps.bucket,
                ticket,
                settlement(deployment, estimate, CallFailed("not called", kind="unavailable")),
            )
            return Next.DONE
        started = time.monotonic()
        # A call never outlives the request's deadline.
        timed = replace(
            call, timeout_s=max(0.1, min(call.timeout_s, left_s)), attempt_id=f"{run.request_id}:{attempt_no}"
        )
        outcome = call_provider(deps.adapters[deployment.provider], timed)
        latency_ms = round((time.monotonic() - started) * 1000)
        settle(deps.bucket, ticket, settlement(deployment, estimate, outcome))
        deps.breaker.record(
            deployment.name,
            f"{run.request_id}:{attempt_no}",
            failed=is_provider_failure(outcome),
            probe=permit.probe,
        )
        step = _record(deps, run, deployment, attempt_no, outcome, latency_ms)
        if step is None:
            return Next.DONE
        assert isinstance(outcome, CallFailed)
        if outcome.status == 429 and step is Step.RETRY:
            # The bucket now holds every worker back for the provider's retry-after: this request
            # moves down the chain, or waits in the delay queue, rather than spend its attempts.
            chain.busy(Wait(outcome.retry_after_s or DEFAULT_PAUSE_S, "rate_limited"))
            chain.failures.append(outcome_error(outcome, deployment, attempt_no))
            return Next.FALL_BACK
        if step is Step.FALL_BACK or retry_no + 1 == max_attempts:
            chain.failures.append(outcome_error(outcome, deployment, attempt_no))
            return Next.FALL_BACK
        delay = backoff_s(
            retry_no,
            base_s=settings.backoff_base_s,
            max_s=settings.backoff_max_s,
            retry_after_s=outcome.retry_after_s,
        )
        if delay > settings.max_inline_wait_s:
            # Holding a worker slot this long starves every other request; let the chain go on.
            error = outcome_error(outcome, deployment, attempt_no)
            chain.failures.append({**error, "message": f"{error['message']} (asked to wait {delay:.0f}s)"})
            return Next.FALL_BACK
        deps.sleep(delay)
    return Next.FALL_BACK


def outcome_error(outcome: CallFailed, deployment: Deployment, attempt_no: int) -> dict[str, Any]:
    return {**outcome.as_error(), "deployment": deployment.name, "attempt": attempt_no}


def _record(
    deps: Deps,
    run: ledger.RunStart,
    deployment: Deployment,
    attempt_no: int,
    outcome: ProviderReply | CallFailed,
    latency_ms: int,
) -> Step | None:
    """Write the attempt (and, when it decides the request, its end). None when the request ended."""
    if isinstance(outcome, ProviderReply):
        ledger.finish_attempt(
            deps.db,
            run.request_id,
            attempt_no,
            ledger.AttemptResult(
                AttemptOutcome.SUCCESS,
                latency_ms,
                http_status=outcome.http_status,
                usage=outcome.usage,
                cost_usd=call_cost_usd(deployment, outcome.usage),
                provider_request_id=outcome.provider_request_id,
            ),
            ledger.RequestEnd(RequestStatus.SUCCEEDED, response=outcome.body, deployment=deployment.name),
        )
        return None
    step = classify(outcome)
    error = outcome_error(outcome, deployment, attempt_no)
    result = ledger.AttemptResult(
        _OUTCOME_OF_STEP[step],
        latency_ms,
        http_status=outcome.status,
        error=error,
        provider_request_id=outcome.provider_request_id,
    )
    log.info(
        "request %s attempt %d on %s: %s -> %s",
        run.request_id,
        attempt_no,
        deployment.name,
        outcome.message[:200],
        step,
    )
    if step is Step.FAIL:
        end = ledger.RequestEnd(RequestStatus.FAILED, error=error, deployment=deployment.name)
        ledger.finish_attempt(deps.db, run.request_id, attempt_no, result, end)
        return None
    ledger.finish_attempt(deps.db, run.request_id, attempt_no, result)
    return step


def call_provider(adapter: ProviderAdapter, call: ProviderCall) -> ProviderReply | CallFailed:
    """The call, with every failure turned into a ``CallFailed``: never raises."""
    try:
        return adapter.complete(call)
    except CallFailed as failure:
        return failure
    except Exception as exc:  # an adapter bug must not lose the request or its attempt row
        log.exception("adapter %s raised %s", adapter.name, type(exc).__name__)
        return CallFailed(f"{type(exc).__name__}: {exc}", kind="invalid_reply")


def _estimate_cost(
    config: DeploymentsConfig, deployment: str, tokens_in: int, tokens_out: int
) -> Decimal | None:
    try:
        dep = config.deployment(deployment)
    except KeyError:
        return None
    return call_cost_usd(dep, Usage(tokens_in, tokens_out))
