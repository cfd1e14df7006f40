"""One request, top to bottom: lease it, begin its run, walk its route's chain (each deployment's
attempts in ``workers.attempts``), then end it, park it, or hand it back.

After a call the ledger write comes first: the call was paid for, so its attempt row (usage, cost,
outcome) is written before anything else and held through a ledger outage. Everything after it
that touches Redis (bucket settlement, breaker, counters) is best-effort and can never lose it.

Every way out leaves the request ended, or in a state a sweep picks up: parked in the delay
queue, handed back to the outbox, or RUNNING under a lease that is released on the way out (the
recovery sweep requeues a running request whose lease is gone).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import Any

import redis
import structlog
from kombu.exceptions import KombuError as BrokerError
from sqlalchemy.exc import SQLAlchemyError

from broker_config.deployments import DeploymentsConfig, Route
from broker_config.settings import Settings
from db.states import Priority, RequestStatus
from db.types import utcnow
from workers import budgets, cached_runs, ledger, lost_calls, observe, spans
from workers.admission import estimate_call, estimate_prompt_tokens, requested_max_tokens
from workers.attempts import best_effort, end_without_call, try_deployment
from workers.costing import call_cost_usd
from workers.holds import Hold, hold
from workers.input_budget import fit
from workers.leases import Lease
from workers.policy import busy_park_s, park_s
from workers.providers.base import Usage
from workers.run_deps import Deps, Walk

__all__ = ["Deps", "longest_call_s", "longest_run_s", "recovery_claim", "run_request"]

log = structlog.get_logger(__name__)
DUPLICATE_RETRY_S = 1.0


def run_request(request_id: str, deps: Deps) -> None:
    """Run one request to its end, or park it until a deployment has room. Safe to call again: a
    delivery of a request whose run is alive elsewhere does nothing. Never raises."""
    # Every line this run logs carries its ids (the task clears them: workers/tasks.py).
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        lease = deps.leases.acquire(request_id)
    except redis.RedisError as exc:
        log.warning("request handed back: Redis unreachable", error=str(exc))
        _hand_back(deps, request_id, None, clean=True)
        return
    if lease is None:
        _duplicate(deps, request_id)
        return
    try:
        run = ledger.begin_run(deps.db, request_id, lease.token, recovery_claim(deps))
        if run is not None:
            structlog.contextvars.bind_contextvars(batch_id=run.batch_id, tenant=run.tenant)
            spans.run_started(run)
            _walk_chain(run, lease, deps)
    except (redis.RedisError, BrokerError) as exc:
        # Redis went away mid-run: the outbox's publisher sweep sends it again once it is back.
        log.warning("request handed back: Redis unreachable", error=str(exc))
        _hand_back(deps, request_id, lease.token, clean=True)
    except Exception:
        log.exception("request's run failed; handing it back")
        _hand_back(deps, request_id, lease.token, clean=False)
    finally:
        deps.leases.release(lease)


def _duplicate(deps: Deps, request_id: str) -> None:
    """A delivery of a request another run holds the lease of. Dropped while that run owns it
    (the run decides its fate) or once it has ended; but a request its run has just handed back
    to the queue (the lease not yet released) may need this very message, so it comes back a
    moment later instead: a dropped duplicate can never strand its request."""
    try:
        queued = ledger.queued_priority(deps.db, request_id)
    except SQLAlchemyError as exc:
        # A ledger outage, or a pooled connection found dead (workers lend them without a
        # pre-ping): this may be the only message of a request handed back, so it goes back to the
        # outbox (a write, held through the outage) rather than away.
        log.warning("duplicate delivery not checked; left to the outbox", error=str(exc))
        _hand_back(deps, request_id, None, clean=True)
        return
    if queued is None:
        log.info("request is running elsewhere; this delivery is a duplicate")
        return
    log.info("request is being handed back elsewhere; this delivery comes back shortly")
    deps.delays.park(request_id, queued, DUPLICATE_RETRY_S)


def _hand_back(deps: Deps, request_id: str, token: str | None, *, clean: bool) -> None:
    """Back to the outbox. If even that fails (the ledger is down), the request stays RUNNING
    under a lease released on the way out, or QUEUED with no message: the recovery and
    lost-message sweeps find it once the ledger is back."""
    try:
        if not ledger.hand_back(deps.db, request_id, token, clean=clean) and token is not None:
            ledger.hand_back(deps.db, request_id, None, clean=clean)  # begin_run never committed
    except Exception as exc:
        log.warning("request left for the sweeps", error=type(exc).__name__)


def recovery_claim(deps: Deps) -> lost_calls.Claim:
    return lost_calls.Claim(
        estimate_lost=partial(_estimate_lost_call, deps.config, deps.settings.default_max_tokens),
        max_deliveries=deps.settings.max_deliveries,
    )


def _walk_chain(run: ledger.RunStart, lease: Lease, deps: Deps) -> None:
    route = deps.config.resolve(run.model)
    if route is None:
        message = f"no route or deployment serves model {run.model!r} any more"
        end_without_call(deps, run, lease, RequestStatus.FAILED, {"kind": "config", "message": message})
        return
    if run.tenant_paused and run.priority != Priority.INTERACTIVE:
        message = f"tenant {run.tenant!r} is paused: 'headrace tenants resume {run.tenant}' lets it go on"
        why = Hold("tenant_paused", message, recheck_s=deps.settings.hold_recheck_s)
        hold(deps, run, lease, why, deadline=_deadline(run, route), route=route.name)
        return
    if route.max_input_tokens is not None:
        fitted = _within_input_budget(run, lease, route, deps)
        if fitted is None:
            return
        run = fitted
    plan = cached_runs.plan(run, route, deps)
    if plan is not None and cached_runs.serve_stored(run, lease, route, plan, deps):
        return  # a cached answer, whatever the budgets say
    gated = budgets.gate(run, lease, route, deps)  # held, downgraded, or what calls reserve
    if gated is None:
        return
    if gated[0] is not route:  # downgraded: its answer is the cheaper route's
        route, plan = gated[0], cached_runs.plan(run, gated[0], deps)
    charges = gated[1]
    flight = None
    if plan is not None:
        flight = cached_runs.take_flight(run, lease, route, plan, deps, _deadline(run, route))
    if isinstance(flight, str):  # answered by an identical request in flight, or waiting for it
        return
    walk = Walk(run, lease, route, deadline=_deadline(run, route), budgets=charges)
    try:
        _walk(walk, deps)
    finally:
        cached_runs.land(flight, walk, deps)  # the answer stored, the flight let go


def _walk(walk: Walk, deps: Deps) -> None:
    """Down the chain until a deployment answers or the request ends; else fail, or wait."""
    route = walk.route
    for position, name in enumerate(route.deployments):
        if position:
            observe.fell_back(route.name, route.deployments[position - 1], name)
            best_effort("fallback count", deps.fallbacks.activated, route.name, name)
        try_deployment(walk, deps.config.deployment(name), deps)
        if walk.over:
            return
        if walk.held_by_budget:  # the next deployment draws on the same budget
            break
    budget = route.max_attempts_per_request or deps.settings.max_attempts_per_request
    errors = walk.last_errors()
    if walk.billed >= budget:
        message = (
            f"{walk.billed} calls the provider may have charged for, the most route {route.name!r} allows"
        )
        _fail(deps, walk, {"kind": "exhausted", "message": message, "deployments": errors})
    elif walk.soonest_room_s is None and not any(f.get("passes") for f in walk.failures):
        message = f"every deployment of route {route.name!r} failed, and waiting would not change that"
        _fail(deps, walk, {"kind": "exhausted", "message": message, "deployments": errors})
    else:
        _wait(deps, walk, errors)


def _within_input_budget(
    run: ledger.RunStart, lease: Lease, route: Route, deps: Deps
) -> ledger.RunStart | None:
    """The run with its body within the route's ``max_input_tokens`` (trimmed if the route says so
    and the trim is noted for its result line), or None: the request ended ``failed`` here."""
    limit = route.max_input_tokens
    assert limit is not None
    estimated = estimate_prompt_tokens(run.body)
    if estimated <= limit:
        return run
    fitted = fit(run.body, limit, estimate_prompt_tokens) if route.on_overflow == "trim" else None
    if fitted is None:
        how = "even trimmed to its system messages and last turn, " if route.on_overflow == "trim" else ""
        message = (
            f"its prompt is {how}an estimated {estimated} tokens; route {route.name!r} allows "
            f"{limit} (max_input_tokens)"
        )
        error = {"kind": "input_too_long", "message": message, "max_input_tokens": limit}
        end_without_call(deps, run, lease, RequestStatus.FAILED, error)
        return None
    ledger.note_request(deps.db, run.request_id, lease.token, {"trimmed_messages": fitted.dropped})
    return replace(run, body=fitted.body)


def _fail(deps: Deps, walk: Walk, error: dict[str, Any]) -> None:
    last = error["deployments"][-1]["deployment"] if error["deployments"] else None
    end_without_call(deps, walk.run, walk.lease, RequestStatus.FAILED, error, deployment=last)


def _wait(deps: Deps, walk: Walk, errors: list[dict[str, Any]]) -> None:
    """Every deployment that could take it is busy, or in trouble that passes: the request waits in
    the delay queue, not in a slot (as long as a busy one asked; for trouble, a backoff growing
    with each round), then runs its chain again, unless its deadline comes first: then it ends
    ``expired`` now, with each deployment's last error. Should parking fail, the request goes back
    to the outbox (see ``run_request``)."""
    run, settings = walk.run, deps.settings
    trouble = walk.soonest_room_s is None
    delay_s = (
        park_s(run.park_rounds, base_s=settings.park_base_s, max_s=settings.park_max_s)
        if trouble
        else walk.soonest_room_s or 0.0
    )
    if utcnow() + timedelta(seconds=delay_s) >= walk.deadline:
        message = "its deadline comes before any deployment of its route can take it"
        if walk.held_by_budget:
            message = "its deadline comes before its budget has room for it"
        end_without_call(
            deps,
            run,
            walk.lease,
            RequestStatus.EXPIRED,
            {"kind": "expired", "message": message, "deployments": errors},
        )
        return
    if not trouble:
        delay_s = busy_park_s(delay_s, walk.expected_room_s, (walk.deadline - utcnow()).total_seconds())
    reason = "provider trouble" if trouble else "no room"
    waiting = {"kind": "waiting", "message": f"waiting {delay_s:.1f}s ({reason})", "deployments": errors}
    if ledger.defer_run(deps.db, run.request_id, walk.lease.token, waiting=waiting, trouble=trouble):
        # Woken early when the breaker of a deployment that was in trouble closes again.
        troubled = {
            e["deployment"]
            for e in walk.failures
            if e.get("passes") and ("attempt" in e or e["kind"] == "circuit_open")  # a call's trouble
        }
        deps.delays.park(run.request_id, run.priority, delay_s, wake_on=sorted(troubled))
        observe.parked(walk.route.name, "trouble" if trouble else "no_room")


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
