"""The answer cache's place in a run (``workers/pipeline.py``), in three steps:

    plan           what the run may do with the cache on its route (None: nothing)
    serve_stored   before the budgets' gate: an answer already in the cache ends the request at no
                   cost (so a budget's ``cache_only`` step still serves what is cached)
    take_flight    after it: lead the call for this answer, or follow the identical request that
                   leads it and end with its answer (``workers/single_flight.py``)
    land           after the chain: the answer this run got is stored, and its flight let go

What may be cached, and under which key: ``workers/answer_cache.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog

from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger, observe
from workers.answer_cache import AnswerCache, CachedAnswer, CachePlan, plan_for
from workers.ledger_served import Served, serve_answer
from workers.single_flight import Flights, flight_value

if TYPE_CHECKING:
    from broker_config.deployments import Route
    from workers.leases import Lease
    from workers.run_deps import Deps, Walk
    from workers.semantic_cache import SemanticCache

log = structlog.get_logger(__name__)

ENDED: Literal["ended"] = "ended"  # the request ended here (or is no longer this run's)
FIRST_POLL_S = 0.05
MAX_POLL_S = 0.5
FOLLOW_AGAIN_S = 2.0  # a follower that waited its fill steps back this long, then looks again


@dataclass
class CacheDeps:
    """The cache's parts in a worker: answers in the cache Redis, flights in the state Redis."""

    answers: AnswerCache
    flights: Flights
    semantic: SemanticCache | None = None


@dataclass
class Flight:
    """What a run that goes on to its chain does with the cache afterwards."""

    plan: CachePlan
    leads: str | None = None  # its flight value, while it leads the call


def plan(run: ledger.RunStart, route: Route, deps: Deps) -> CachePlan | None:
    """What the run does with the cache on ``route`` (None: nothing)."""
    return plan_for(route, run.tenant, run.tags, run.body) if deps.cache is not None else None


def serve_stored(run: ledger.RunStart, lease: Lease, route: Route, plan: CachePlan, deps: Deps) -> bool:
    """End the request with a cached answer, if there is one; whether it ended (or is no longer
    this run's)."""
    cache = deps.cache
    if cache is None or not plan.lookup:
        return False
    answer = cache.answers.get(plan.key)
    if answer is not None:
        observe.cache_lookup(route.name, "hit")
        return _serve(
            run, lease, route, deps, Served(answer, AttemptOutcome.CACHE_HIT, "cache", {"cached": True})
        )
    if plan.semantic and cache.semantic is not None:
        found = cache.semantic.nearest(plan, run.body)
        if found is not None:
            answer, similarity = found
            observe.cache_lookup(route.name, "semantic_hit")
            notes = {"cached": True, "similarity": round(similarity, 4)}
            served = Served(answer, AttemptOutcome.CACHE_HIT, "semantic_cache", notes)
            return _serve(run, lease, route, deps, served)
    observe.cache_lookup(route.name, "miss")
    return False


def take_flight(
    run: ledger.RunStart, lease: Lease, route: Route, plan: CachePlan, deps: Deps, deadline: datetime
) -> Flight | Literal["ended"] | None:
    """Before the chain: None (no cache), a ``Flight`` (go on and call; it leads the call when
    identical requests may follow), or ``ENDED`` (answered by the identical request that led,
    ended ``expired`` waiting for it, or stepped back to the delay queue)."""
    cache = deps.cache
    if cache is None:
        return None
    if not plan.coalesce:
        return Flight(plan)
    ours = flight_value(run.request_id, lease.token)
    give_up = time.monotonic() + deps.settings.coalesce_wait_s
    poll_s = FIRST_POLL_S
    while True:
        holder = cache.flights.holder(plan.key)
        if holder is None or not cache.flights.alive(holder):
            if not cache.flights.claim(plan.key, ours, holder):
                continue  # another follower took it first: follow that one
            # The answer may have come since it was looked up: a leader that let go just now.
            answer = cache.answers.get(plan.key)
            if answer is None:
                return Flight(plan, leads=ours)
            cache.flights.release(plan.key, ours)
            return _coalesced(run, lease, route, deps, answer)
        answer = cache.answers.get(plan.key)
        if answer is not None:
            return _coalesced(run, lease, route, deps, answer)
        if lease.lost:
            return ENDED
        left_s = (deadline - utcnow()).total_seconds()
        if left_s <= 0:
            message = "its deadline came while an identical request in flight was still being answered"
            error = {"kind": "expired", "message": message, "deployments": list(run.last_errors)}
            _end(run, lease, route, deps, RequestStatus.EXPIRED, error)
            return ENDED
        if time.monotonic() >= give_up:
            _step_back(run, lease, route, deps, min(FOLLOW_AGAIN_S, left_s))
            return ENDED
        deps.sleep(min(poll_s, left_s))
        poll_s = min(poll_s * 1.5, MAX_POLL_S)


def land(flight: Flight | None, walk: Walk | None, deps: Deps) -> None:
    """After the chain: store the answer this run got (if it got one), then let its flight go, so
    that its followers find the answer, or one of them leads the call instead. Never raises."""
    cache = deps.cache
    if flight is None or cache is None:
        return
    try:
        answered = walk.answered if walk is not None else None
        if answered is not None:
            reply, deployment, cost = answered
            usage = reply.usage
            answer = CachedAnswer(
                response=reply.body,
                deployment=deployment.name,
                provider=deployment.provider,
                model=deployment.model,
                cost_usd=None if cost is None else str(cost),
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
            )
            stored = cache.answers.put(flight.plan.key, answer, flight.plan.ttl_s)
            if stored and walk is not None and flight.plan.semantic and cache.semantic is not None:
                cache.semantic.add(flight.plan, walk.run.body, flight.plan.key)
    except Exception as exc:  # the answer is in the ledger already; the cache is best-effort
        log.warning("answer not cached", error=type(exc).__name__)
    finally:
        if flight.leads is not None:
            cache.flights.release(flight.plan.key, flight.leads)


def _coalesced(
    run: ledger.RunStart, lease: Lease, route: Route, deps: Deps, answer: CachedAnswer
) -> Literal["ended"]:
    observe.cache_lookup(route.name, "coalesced")
    _serve(
        run, lease, route, deps, Served(answer, AttemptOutcome.COALESCED, "coalesced", {"coalesced": True})
    )
    return ENDED


def _serve(run: ledger.RunStart, lease: Lease, route: Route, deps: Deps, served: Served) -> bool:
    status = serve_answer(deps.db, run.request_id, lease.token, served, deps.worker)
    if status is not None:
        saved = served.answer.saved_usd if status == RequestStatus.SUCCEEDED else None
        observe.served(route.name, served.served_from if saved is not None else None, saved)
        observe.request_ended(route.name, run.priority, status.value)
    return True


def _end(
    run: ledger.RunStart,
    lease: Lease,
    route: Route,
    deps: Deps,
    status: RequestStatus,
    error: dict[str, Any],
) -> None:
    ledger.end_run(deps.db, run.request_id, lease.token, ledger.RequestEnd(status, error=error))
    observe.request_ended(route.name, run.priority, status.value)


def _step_back(run: ledger.RunStart, lease: Lease, route: Route, deps: Deps, delay_s: float) -> None:
    """Waited its fill for an identical request in flight: to the delay queue, not a worker slot."""
    waiting = {"kind": "waiting", "message": f"waiting {delay_s:.1f}s for an identical request in flight"}
    if ledger.defer_run(deps.db, run.request_id, lease.token, waiting=waiting):
        deps.delays.park(run.request_id, run.priority, delay_s)
        observe.parked(route.name, "coalescing")
