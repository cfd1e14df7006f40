"""``GET /metrics``: this API process's own metrics, and the pool's shared state read from Redis
when Prometheus scrapes (queues, the delay queue, every deployment's bucket and breaker, every
budget's spend this period).

The shared state is served here, once, rather than by every worker: it lives in Redis, not in
any process, and one scrape target keeps it from being counted N times. Metric definitions of
the per-process counters are in ``broker_config.metrics``; these are gauges of a moment.

With ``headrace api --workers N`` (N > 1) the API runs in prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``), so that a scrape sees every API process's counters summed,
whichever process answers it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.budget_view import budget_views
from api.context import AppContext
from broker_config.bucket_state import delayed_requests, read_state
from broker_config.queue_state import read_queues
from db.budgets import budget_rules

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class PoolState(Collector):
    """The pool's shared state, read from Redis at each scrape."""

    def __init__(self, context: AppContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        started = time.monotonic()
        up = GaugeMetricFamily("headrace_state_redis_up", "1 when the last scrape could read Redis.")
        try:
            yield from self._queues()
            yield from self._deployments()
            yield from self._budgets()
            up.add_metric([], 1)
        except redis.RedisError as exc:
            log.warning("metrics: Redis unreadable (%s)", type(exc).__name__)
            up.add_metric([], 0)
        yield up
        took = GaugeMetricFamily("headrace_state_scrape_seconds", "Time the last read of Redis took.")
        took.add_metric([], time.monotonic() - started)
        yield took

    def _queues(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "headrace_queue_depth", "Messages waiting per priority queue.", labels=["priority"]
        )
        age = GaugeMetricFamily(
            "headrace_queue_oldest_age_seconds",
            "Age of the oldest message waiting per priority queue (0 when empty).",
            labels=["priority"],
        )
        for queue in read_queues(self.context.redis):
            depth.add_metric([queue.priority], queue.depth)
            age.add_metric([queue.priority], queue.oldest_age_s)
        delayed = GaugeMetricFamily(
            "headrace_delay_queue_depth", "Requests parked until a deployment has room or recovers."
        )
        delayed.add_metric([], delayed_requests(self.context.redis))
        yield from (depth, age, delayed)

    def _deployments(self) -> Iterator[Metric]:
        labels = ["deployment"]
        breaker = GaugeMetricFamily(
            "headrace_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.", labels=labels
        )
        factor = GaugeMetricFamily(
            "headrace_rate_factor",
            "Share of its limits a deployment is held to after 429s (1: all).",
            labels=labels,
        )
        paused = GaugeMetricFamily(
            "headrace_deployment_paused_seconds",
            "Time left of a pause a 429 imposed on every worker.",
            labels=labels,
        )
        calls = GaugeMetricFamily(
            "headrace_bucket_in_flight_calls", "Calls admitted and not yet settled, pool-wide.", labels=labels
        )
        available = GaugeMetricFamily(
            "headrace_bucket_available",
            "Room left in a deployment's bucket now, per limit (negative: a debt being refilled).",
            labels=["deployment", "limit"],
        )
        capacity = GaugeMetricFamily(
            "headrace_bucket_capacity",
            "A deployment's limit per minute: configured, learned from the provider's headers, "
            "and effective (what the bucket enforces now).",
            labels=["deployment", "limit", "kind"],
        )
        reserved = GaugeMetricFamily(
            "headrace_bucket_reserved",
            "Room held by calls in flight, per limit.",
            labels=["deployment", "limit"],
        )
        recovery = self.context.settings.rate_factor_recovery_per_s
        for deployment in self.context.config.deployments:
            state = read_state(self.context.state_redis, deployment, recovery_per_s=recovery)
            name = [state.name]
            breaker.add_metric(name, BREAKER_STATES.get(state.breaker, 0))
            factor.add_metric(name, state.rate_factor)
            paused.add_metric(name, state.paused_for_s)
            calls.add_metric(name, state.in_flight_calls)
            for limit in state.limits:
                available.add_metric([state.name, limit.name], limit.level)
                reserved.add_metric([state.name, limit.name], limit.in_flight)
                capacity.add_metric([state.name, limit.name, "configured"], limit.configured)
                capacity.add_metric([state.name, limit.name, "effective"], limit.effective)
                if limit.learned is not None:
                    capacity.add_metric([state.name, limit.name, "learned"], limit.learned)
        yield from (breaker, factor, paused, calls, available, capacity, reserved)

    def _budgets(self) -> Iterator[Metric]:
        """Every budget's limit and spend this period (a few per tenant: bounded by the admins)."""
        labels = ["tenant", "budget", "period"]
        limit = GaugeMetricFamily(
            "headrace_budget_limit_usd", "What a budget's period may spend.", labels=labels
        )
        spent = GaugeMetricFamily(
            "headrace_budget_spent_usd", "What a budget's period has spent (settled calls).", labels=labels
        )
        held = GaugeMetricFamily(
            "headrace_budget_reserved_usd",
            "Worst-case cost reserved by a budget's calls in flight.",
            labels=labels,
        )
        reset = GaugeMetricFamily(
            "headrace_budget_resets_at_seconds", "When a budget's period ends (Unix time).", labels=labels
        )
        try:
            with self.context.db.session() as session:
                views = budget_views(session, self.context.state_redis, budget_rules(session))
        except SQLAlchemyError as exc:  # the ledger away: the rest of the scrape still answers
            log.warning("metrics: budgets unreadable (%s)", type(exc).__name__)
            views = []
        for view in views:
            values = [view.rule.tenant, view.rule.name, view.rule.period]
            limit.add_metric(values, float(view.rule.limit_usd))
            spent.add_metric(values, float(view.spent))
            held.add_metric(values, float(view.held))
            reset.add_metric(values, view.end.timestamp())
        yield from (limit, spent, held, reset)


def pool_registry(context: AppContext) -> CollectorRegistry:
    """The registry a scrape reads besides this process's (or every API process's) own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolState(context))
    return registry


def _own_metrics() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format. Unauthenticated, as exporters are: it holds no tenant's data."""
    registry: CollectorRegistry = request.app.state.pool_metrics

    def render() -> bytes:
        return _own_metrics() + generate_latest(registry)

    return Response(await run_in_threadpool(render), media_type=CONTENT_TYPE)
