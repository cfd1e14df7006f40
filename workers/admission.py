"""Getting room in a deployment's bucket before a call, and giving back what the call did not use.

Short waits are spent in place (the slot stays busy for at most ``max_inline_wait_s``); a longer
wait is handed back to the pipeline, which tries the next deployment of the chain or parks the
request in the delay queue, so that no worker slot idles for long and no request is lost.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from broker_config.deployments import Deployment, TenantLimits
from workers.accounting import Estimate, admission_charges, tenant_charges
from workers.bucket import Bucket, Charge, Settlement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ticket:
    """Room reserved for one call; settle it when the call ends."""

    deployment: Deployment
    reservation_id: str
    charges: list[Charge]
    tenant: str | None
    tenant_charges: list[Charge]


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


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
) -> Ticket | Wait | TooLarge:
    charges = admission_charges(deployment, estimate)
    ceiling = tenant_charges(tenant, estimate)
    tenant_name = tenant.name if tenant else None
    waited = 0.0
    while True:
        reservation_id = f"{request_id}:{uuid.uuid4().hex[:10]}"
        admission = bucket.take(
            deployment.name,
            reservation_id,
            charges,
            priority=priority,
            tenant=tenant_name,
            tenant_charges=ceiling,
        )
        if admission.status == "granted":
            return Ticket(deployment, reservation_id, charges, tenant_name, ceiling)
        if admission.status == "never":
            on_tenant = admission.reason.startswith("tenant:")
            limit_name = admission.reason.removeprefix("tenant:")
            cost = next(c.cost for c in (ceiling if on_tenant else charges) if c.name == limit_name)
            whose = "tenant ceiling" if on_tenant else "limit"
            return TooLarge(
                f"the request needs {cost:.0f} {limit_name} but the {whose} of deployment "
                f"{deployment.name!r} is {admission.limit} per minute: it can never fit there"
            )
        if admission.wait_s > max_inline_wait_s or waited + admission.wait_s > 2 * max_inline_wait_s:
            return Wait(admission.wait_s, admission.reason)
        # Jitter, so that workers woken for the same refill do not all ask at the same instant.
        pause = admission.wait_s * random.uniform(1.0, 1.25)
        sleep(pause)
        waited += pause


def settle(bucket: Bucket, ticket: Ticket, settlement: Settlement) -> None:
    """Never fails the request: a bucket we cannot reach only loses the refund (it over-throttles)."""
    try:
        bucket.settle(
            ticket.deployment.name,
            ticket.reservation_id,
            ticket.charges,
            settlement,
            tenant=ticket.tenant,
            tenant_charges=ticket.tenant_charges,
        )
    except redis.RedisError as exc:
        log.warning("could not settle reservation %s (%s); it expires on its own", ticket.reservation_id, exc)
