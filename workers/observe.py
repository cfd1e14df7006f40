"""What a worker tells the metrics (``broker_config.metrics``, which owns every metric) about the
calls, requests and sweeps it saw: every worker-side observation goes through here. Each is made
after the ledger has what it reports, so summed over the pool, tokens and cost equal the
ledger's sums.

``HEADRACE_METRICS_ENABLED=false`` turns every function here into a no-op (and serves nothing):
what ``bench/pipeline.py --observability off`` measures the cost of metrics against.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from broker_config import metrics
from broker_config.deployments import Deployment, DeploymentsConfig
from broker_config.settings import get_settings
from db.events import EventKind
from db.states import TERMINAL_REQUEST_STATUSES, AttemptOutcome, Priority
from workers.providers.base import CallFailed, ProviderReply, Usage

log = logging.getLogger(__name__)
_enabled = True


def configure(enabled: bool, config: DeploymentsConfig | None = None) -> None:
    """Switch recording on or off for this process. With the pool's config, every series it can
    produce starts at 0: a counter first seen at 1 hides that first step from rate() and
    increase(), so an alert on "any 429 / any failed webhook" would miss the first one."""
    global _enabled
    _enabled = enabled
    if not enabled or config is None:
        return
    for deployment in config.deployments:
        metrics.rate_limited.labels(deployment.name)
        for outcome in AttemptOutcome:
            if outcome is not AttemptOutcome.IN_FLIGHT:
                metrics.attempts.labels(deployment.name, outcome.value)
        for transition in ("opened", "closed"):
            metrics.breaker_transitions.labels(deployment.name, transition)
    for route in config.routes:
        for before, after in zip(route.deployments, route.deployments[1:], strict=False):
            metrics.fallbacks.labels(route.name, before, after)
        for priority in Priority:
            for status in TERMINAL_REQUEST_STATUSES:
                metrics.requests_ended.labels(route.name, priority.value, status.value)
    for delivery in ("delivered", "retry", "failed"):
        metrics.webhook_deliveries.labels(delivery)
    for kind in EventKind:
        metrics.anomalies.labels(kind.value)
    for route in config.routes:
        if route.cache != "off":
            for result in ("hit", "semantic_hit", "coalesced", "miss"):
                metrics.cache_lookups.labels(route.name, result)


@dataclass(frozen=True)
class Spent:
    """One call's tokens and cost as the ledger recorded them, with what it is attributed to."""

    tenant: str
    route: str
    deployment: str
    tags: Mapping[str, Any]
    usage: Usage
    cost_usd: Decimal | None


def error_type(failure: CallFailed) -> str:
    """The conventions' ``error.type``: the HTTP status when the provider answered, else the kind."""
    return str(failure.status) if failure.kind == "status" and failure.status else failure.kind


def call(deployment: Deployment, outcome: ProviderReply | CallFailed, duration_s: float) -> None:
    """One provider call in the GenAI conventions' terms (every call, answered or not)."""
    if not _enabled:
        return
    try:
        if isinstance(outcome, ProviderReply):
            model = outcome.body.get("model") if isinstance(outcome.body, dict) else None
            metrics.observe_call(
                provider=deployment.provider,
                request_model=deployment.model,
                response_model=model if isinstance(model, str) else None,
                duration_s=duration_s,
                error_type=None,
                input_tokens=outcome.usage.input_tokens,
                output_tokens=outcome.usage.output_tokens,
                first_chunk_s=outcome.first_chunk_s,
                chunks=outcome.chunks,
            )
        else:
            metrics.observe_call(
                provider=deployment.provider,
                request_model=deployment.model,
                response_model=None,
                duration_s=duration_s,
                error_type=error_type(outcome),
            )
            if outcome.status == 429:
                metrics.rate_limited.labels(deployment.name).inc()
    except Exception:  # pragma: no cover - a metrics bug must not end a run
        log.exception("metrics: a call was not recorded")


def attempt(deployment: str, outcome: str) -> None:
    if not _enabled:
        return
    metrics.attempts.labels(deployment, outcome).inc()


def spent(items: Iterable[Spent]) -> None:
    """Tokens and cost the ledger has just recorded (a call's, or lost calls' estimates)."""
    if not _enabled:
        return
    settings = get_settings()
    counters = metrics.spend(settings.metric_tags, settings.metric_label_values)
    for item in items:
        counters.record(
            tenant=item.tenant,
            route=item.route,
            deployment=item.deployment,
            tags=item.tags,
            input_tokens=item.usage.input_tokens,
            output_tokens=item.usage.output_tokens,
            cached_input_tokens=item.usage.cache_read_tokens,
            cost_usd=float(item.cost_usd) if item.cost_usd is not None else None,
        )


def request_ended(route: str, priority: str, status: str) -> None:
    if not _enabled:
        return
    metrics.requests_ended.labels(route, priority, status).inc()


def reservation(deployment: str, reserved_tokens: int, usage: Usage) -> None:
    """How far the tokens a call used were from what admission held for it."""
    if not _enabled:
        return
    if reserved_tokens > 0:
        used = usage.input_tokens + usage.output_tokens
        metrics.reservation_ratio.labels(deployment).observe(used / reserved_tokens)


def lease_recovered(lost: list[Spent]) -> None:
    """A run found dead by the sweep: its request requeued, its calls in flight costed as lost."""
    if not _enabled:
        return
    metrics.leases_recovered.inc()
    lost_calls(lost)


def lost_calls(lost: list[Spent]) -> None:
    for item in lost:
        attempt(item.deployment, "lost")
    spent(lost)


def requests_ended(ended: Counter[tuple[str, str]], status: str) -> None:
    """Requests a sweep ended together, counted by (route asked for, priority)."""
    if not _enabled:
        return
    for (route, priority), count in ended.items():
        metrics.requests_ended.labels(route, priority, status).inc(count)


def call_started(deployment: str) -> None:
    if _enabled:
        metrics.in_flight_calls.labels(deployment).inc()


def call_ended(deployment: str) -> None:
    if _enabled:
        metrics.in_flight_calls.labels(deployment).dec()


def waited_for_room(deployment: str, seconds: float) -> None:
    if _enabled:
        metrics.rate_limit_wait.labels(deployment).observe(seconds)


def fell_back(route: str, from_deployment: str, to_deployment: str) -> None:
    if _enabled:
        metrics.fallbacks.labels(route, from_deployment, to_deployment).inc()


def parked(route: str, reason: str) -> None:
    if _enabled:
        metrics.requests_parked.labels(route, reason).inc()


def breaker_changed(deployment: str, transition: str) -> None:
    if _enabled:
        metrics.breaker_transitions.labels(deployment, transition).inc()


def webhook_delivery(outcome: str) -> None:
    if _enabled:
        metrics.webhook_deliveries.labels(outcome).inc()


def anomaly(kind: str) -> None:
    """An anomaly event the ledger has just recorded (not one a cooldown folded into an earlier)."""
    if _enabled:
        metrics.anomalies.labels(kind).inc()


def cache_lookup(route: str, result: str) -> None:
    if _enabled:
        metrics.cache_lookups.labels(route, result).inc()


def served(route: str, served_from: str | None, saved_usd: Decimal | None) -> None:
    """A request the ledger has just ended with an answer it did not pay for again."""
    if _enabled and served_from is not None:
        metrics.cache_saved.labels(route, served_from).inc(float(saved_usd or 0))
