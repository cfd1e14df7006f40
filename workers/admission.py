"""Rate-limit admission, top to bottom: how big a call is, what it takes from each limit, taking
that from the shared bucket in one atomic step (or waiting, or never), and settling it once the
call has ended.

    estimate_call(deployment, body)            estimated prompt + output cap x n
    admit(bucket, deployment, estimate, ...)   Bucket.take -> lua/bucket_take.lua, all or nothing;
                                               OTPM may reserve the learned output instead of the
                                               cap (learn_output: workers/output_estimate.py)
        -> Ticket | Wait (how long, and why) | TooLarge (can never fit there)
    ... the provider call ...
    settlement(deployment, estimate, outcome)  what the call really counted, limit by limit, and
                                               what the provider's headers forecast (forecast.py)
    settle(bucket, ticket, settlement, call)   Bucket.settle -> lua/bucket_settle.lua; never raises

The deployment's circuit breaker (``workers/breaker.py``, ``lua/breaker.lua``) is asked in the
take and told how the call went in the settlement, in the same atomic step and round trip: a
deployment it keeps shut takes no room, and a half-open probe's place is taken only with room.

One bucket per deployment (and per tenant ceiling) in Redis, shared by every worker on every
host. The algorithm, its units and its clock are in ``lua/prelude.lua``; what a take and a
settlement send to the scripts and what they answer, in ``workers/bucket.py``. The threads of one
process waiting for room on the same deployment take turns to ask it (``workers/waiting_line.py``):
only the head of the line asks, the others wait without Redis or CPU. What people see
(``GET /v1/deployments``) is read by ``lua/bucket_read.lua`` with that same prelude
(``broker_config/bucket_state.py``). How each provider counts (which tokens count against which
limit, the offline prompt estimate, what a call that ended counted) is ``workers/metering.py``,
and how its headers read as a forecast ``workers/forecast.py``, kept apart only so that this
module stays one readable page. Which limits may reserve a learned output rather than max_tokens
(only where the provider counts the output really produced; never OpenAI's TPM, which takes
max_tokens at the door), and how it is learned: ``workers/output_estimate.py``.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import redis

from broker_config.deployments import Deployment, TenantLimits
from workers.breaker import BreakerCall
from workers.bucket import Admission, Bucket, BucketPolicy, BudgetCharge, Charge, Settled
from workers.forecast import Forecast
from workers.metering import (
    DEFAULT_PAUSE_S,
    MAX_PAUSE_S,
    Settlement,
    by_limit,
    estimate_prompt_tokens,
    settlement_of,
)
from workers.output_estimate import Sampling, learnable_limits
from workers.providers.base import CallFailed, ProviderReply, requested_max_tokens
from workers.waiting_line import Place, WaitingLine

__all__ = [
    "DEFAULT_PAUSE_S",
    "MAX_PAUSE_S",
    "Admission",
    "Bucket",
    "BucketPolicy",
    "BudgetCharge",
    "Charge",
    "Estimate",
    "Forecast",
    "Settled",
    "Settlement",
    "Ticket",
    "TooLarge",
    "Wait",
    "admission_charges",
    "admit",
    "estimate_call",
    "estimate_prompt_tokens",
    "learned_charges",
    "requested_max_tokens",
    "settle",
    "settlement",
    "tenant_charges",
]

log = logging.getLogger(__name__)

# --- 1. How big the call is ------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A call's size before it is made: estimated prompt tokens, and the output it may produce."""

    prompt_tokens: int
    output_tokens: int  # max_tokens x n: what the provider may produce (budgets reserve its cost)
    completions: int = 1  # n
    route: str = ""  # the model the request asked for: whose outputs a learned reservation reads


def estimate_call(deployment: Deployment, body: Mapping[str, Any], default_max_tokens: int) -> Estimate:
    """The output cap is the one the adapters send: the body's own, else the deployment's
    ``max_output_tokens``, else ``default_max_tokens`` (``ProviderCall.default_max_tokens``)."""
    n = body.get("n")
    completions = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    max_tokens = requested_max_tokens(body, deployment.max_output_tokens or default_max_tokens)
    model = body.get("model")
    route = model if isinstance(model, str) else ""
    return Estimate(estimate_prompt_tokens(body), max_tokens * completions, completions, route)


def admission_charges(
    deployment: Deployment, estimate: Estimate, learned_output: int | None = None
) -> list[Charge]:
    """What the call takes from each of the deployment's limits, before it is made.
    ``learned_output``: the output reserved instead of the cap on the limits that count real
    output (``output_estimate.learnable_limits``); None: the cap everywhere."""
    costs = by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    learned = costs if learned_output is None else by_limit(1, estimate.prompt_tokens, learned_output)
    learnable = learnable_limits(deployment)
    return [
        Charge(name, limit, (learned if name in learnable else costs)[name] or 0.0)
        for name, limit in deployment.limits().items()
    ]


def learned_charges(bucket: Bucket, deployment: Deployment, estimate: Estimate) -> list[Charge]:
    """``admission_charges`` with the route's learned output where the deployment learns it (the
    figure is the process's own copy, refreshed every few seconds: no round trip per call)."""
    cap = estimate.output_tokens // max(1, estimate.completions)
    learned = bucket.outputs.reservation(deployment, estimate.route, cap, estimate.completions)
    return admission_charges(deployment, estimate, learned)


def tenant_charges(tenant: TenantLimits | None, estimate: Estimate) -> list[Charge]:
    """The same call against a tenant's own ceiling: requests, and all its tokens together."""
    if tenant is None:
        return []
    costs = by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    return [Charge(name, limit, costs[name] or 0.0) for name, limit in tenant.limits().items()]


# --- 2. Before the call: admit (the shared bucket itself: workers/bucket.py) ---------------------


@dataclass(frozen=True)
class Ticket:
    """Room reserved for one call; settle it when the call ends."""

    deployment: Deployment
    reservation_id: str
    charges: list[Charge]
    tenant: str | None
    tenant_charges: list[Charge]
    probe: bool = False  # the half-open breaker's probe: its outcome decides whether it closes
    budgets: tuple[BudgetCharge, ...] = ()  # the worst-case cost reserved from each budget
    sampling: Sampling | None = None  # where its real output is recorded, when its deployment learns


@dataclass(frozen=True)
class Wait:
    seconds: float  # the soonest the deployment may have room for it
    reason: str
    # About when its turn comes, behind those waiting before it in this process's line: what the
    # request parks for, so that it does not come back to find the same line.
    expected_s: float | None = None


@dataclass(frozen=True)
class TooLarge:
    message: str


def admit(
    bucket: Bucket,
    deployment: Deployment,
    estimate: Estimate,
    *,
    request_id: str,
    priority: str,
    tenant: TenantLimits | None,
    max_inline_wait_s: float,
    sleep: Callable[[float], None],
    line: WaitingLine | None = None,
    budgets: tuple[BudgetCharge, ...] = (),
) -> Ticket | Wait | TooLarge:
    """Reserve room for one call. Short waits are spent in place (the slot stays busy for at most
    ``2 x max_inline_wait_s``), in this process's ``line`` for the deployment (only its head asks
    the bucket); a longer one is handed back, and the pipeline tries the next deployment of the
    chain or parks the request in the delay queue for about as long as its turn would take.
    ``budgets``: the call's worst-case cost, reserved in the same step; a budget without room is
    never waited for in place."""
    charges = learned_charges(bucket, deployment, estimate)
    ceiling = tenant_charges(tenant, estimate)
    sampling = bucket.outputs.sampling(deployment, estimate.route, estimate.completions)
    tenant_name = tenant.name if tenant else None
    ttl_s = bucket.policy.reservation_ttl_s(deployment)
    line = line if line is not None else WaitingLine()  # alone in a line of its own: always the head
    budget_s = 2 * max_inline_wait_s
    waited_s = 0.0
    place: Place | None = None
    last = Admission("wait")  # the bucket's latest answer to a take that must wait
    try:
        while True:
            if place is not None and not line.is_head(place):
                turn_started = time.monotonic()
                headed = line.wait_turn(place, budget_s - waited_s)
                waited_s += time.monotonic() - turn_started
                if not headed:
                    return Wait(last.wait_s, last.reason, line.expected_wait_s(place, last.wait_s))
            reservation_id = f"{request_id}:{uuid.uuid4().hex[:10]}"
            admission = bucket.take(
                deployment.name,
                reservation_id,
                charges,
                priority=priority,
                ttl_s=ttl_s,
                tenant=tenant_name,
                tenant_charges=ceiling,
                budgets=budgets,
            )
            if admission.status == "granted":
                line.granted(deployment.name, place)
                place = None
                probe = admission.probe
                return Ticket(
                    deployment, reservation_id, charges, tenant_name, ceiling, probe, budgets, sampling
                )
            if admission.status in ("open", "budget"):  # not worth waiting for in place
                return Wait(admission.wait_s, admission.reason)
            if admission.status == "never":
                return too_large(deployment, admission, charges, ceiling)
            last = admission
            if admission.wait_s > max_inline_wait_s or waited_s + admission.wait_s > budget_s:
                expected = None if place is None else line.expected_wait_s(place, last.wait_s)
                return Wait(admission.wait_s, admission.reason, expected)
            if place is None:
                place = line.join(deployment.name, priority)
                if not line.is_head(place):
                    continue  # the head asks for the line
            # Jitter, so that the heads of several processes woken for the same refill do not
            # all ask at the same instant.
            pause = admission.wait_s * random.uniform(1.0, 1.25)
            sleep(pause)
            waited_s += pause
    finally:
        if place is not None:
            line.leave(place)


def too_large(
    deployment: Deployment, admission: Admission, charges: list[Charge], ceiling: list[Charge]
) -> TooLarge:
    on_tenant = admission.reason.startswith("tenant:")
    limit_name = admission.reason.removeprefix("tenant:")
    cost = next(c.cost for c in (ceiling if on_tenant else charges) if c.name == limit_name)
    whose = "tenant ceiling" if on_tenant else "limit"
    return TooLarge(
        f"the request needs {cost:.0f} {limit_name} but the {whose} of deployment "
        f"{deployment.name!r} is {admission.limit} per minute: it can never fit there"
    )


# --- 3. After the call: settle -------------------------------------------------------------------


def settlement(
    deployment: Deployment, estimate: Estimate, outcome: ProviderReply | CallFailed, *, age_s: float = 0.0
) -> Settlement:
    """What the call really counted, limit by limit, from how it ended (``metering.py``);
    ``age_s``: how long ago the provider answered."""
    return replace(settlement_of(deployment, estimate.prompt_tokens, outcome), age_s=age_s)


def settle(
    bucket: Bucket,
    ticket: Ticket,
    settlement: Settlement,
    *,
    call_id: str = "",
    failed: bool | None = None,
    cost_usd: Decimal | None = None,
) -> Settled:
    """Never raises: a paid call's ledger row must not depend on the bucket. A bucket we cannot
    reach only loses the refund (it over-throttles until the reservation expires) and the call's
    sample of its route's output (when its deployment learns one). ``failed``:
    whether the call says the deployment is unhealthy (None: no call was made, the breaker is not
    told). ``cost_usd``: what the call cost as the ledger recorded it, spent from the budgets
    (an unsettled budget reservation expires and counts at its worst case)."""
    if ticket.budgets:
        try:
            bucket.settle_budgets(ticket.budgets, ticket.reservation_id, float(cost_usd or 0))
        except redis.RedisError as exc:
            log.warning(
                "could not settle budgets of %s (%s); it expires and counts", ticket.reservation_id, exc
            )
    call = None if failed is None else BreakerCall(call_id, failed=failed, probe=ticket.probe)
    answered = settlement.output_tokens
    sample = None if ticket.sampling is None or answered is None else ticket.sampling.sample(answered)
    try:
        return bucket.settle(
            ticket.deployment.name,
            ticket.reservation_id,
            ticket.charges,
            settlement,
            tenant=ticket.tenant,
            tenant_charges=ticket.tenant_charges,
            call=call,
            sample=sample,
        )
    except redis.RedisError as exc:
        log.warning("could not settle reservation %s (%s); it expires on its own", ticket.reservation_id, exc)
    except Exception:  # a bug here must not lose the attempt's row either
        log.exception("settling reservation %s failed", ticket.reservation_id)
    return Settled(False)
