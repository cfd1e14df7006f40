"""Every metric Headrace exports, in one place (``prometheus_client``).

Two families:

- GenAI signals in the OpenTelemetry GenAI semantic conventions' names, Prometheus spelling
  (``gen_ai.client.token.usage`` -> ``gen_ai_client_token_usage``), with the conventions' own
  bucket boundaries and attribute names (``gen_ai_provider_name``, not the deprecated
  ``gen_ai_system``). Headrace is the client of the providers, so these are ``client`` metrics.
- Headrace's own under ``headrace_``; counters end ``_total``.

Who serves what: each worker process serves what its calls observed on its own port
(``HEADRACE_WORKER_METRICS_PORT``); the API serves the pool's shared state, read from Redis when
scraped (``api.metrics_view``): queue depths and ages, buckets, breakers, the delay queue. Summed
over every target, the counters are the pool's.

Cardinality is bounded on purpose: tenant and attribution tags (``HEADRACE_METRIC_TAG_KEYS``) only
on counters, never on histograms, and each such label keeps at most ``metric_label_values``
distinct values per process; past that, "other".
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from broker_config.settings import tag_label

# One ``_created`` series per counter and label set doubles what Prometheus stores for nothing
# a rate() needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The conventions' ExplicitBucketBoundaries (gen-ai-metrics.md).
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0)
OTHER = "other"

_GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model")

token_usage = Histogram(
    "gen_ai_client_token_usage",
    "Tokens per provider call ({token}), by type: input (cache reads and writes included) and output.",
    [*_GENAI, "gen_ai_token_type"],
    buckets=TOKEN_BUCKETS,
)
operation_duration = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of each provider call; error_type is set on failures (an HTTP status or a kind).",
    [*_GENAI, "error_type"],
    buckets=DURATION_BUCKETS,
)
time_to_first_chunk = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Streamed calls: time from sending the request to the first chunk of output.",
    _GENAI,
    buckets=DURATION_BUCKETS,
)
time_per_output_chunk = Histogram(
    "gen_ai_client_operation_time_per_output_chunk_seconds",
    "Streamed calls: time per output chunk after the first.",
    _GENAI,
    buckets=DURATION_BUCKETS,
)

requests_ended = Counter(
    "headrace_requests_ended", "Requests that reached an end, by status.", ["route", "priority", "status"]
)
attempts = Counter(
    "headrace_attempts",
    "Provider calls, by outcome (the policy's decision for a failure).",
    ["deployment", "outcome"],
)
rate_limited = Counter(
    "headrace_provider_rate_limited",
    "Provider answers of HTTP 429: what the shared bucket exists to keep at zero.",
    ["deployment"],
)
fallbacks = Counter(
    "headrace_fallbacks",
    "Times a route's chain moved on from one deployment to the next.",
    ["route", "from_deployment", "to_deployment"],
)
breaker_transitions = Counter(
    "headrace_breaker_transitions",
    "Circuit breaker changes seen by this process: opened, half_open, closed.",
    ["deployment", "transition"],
)
rate_limit_wait = Histogram(
    "headrace_rate_limit_wait_seconds",
    "Time a call waited in its worker for rate-limit room before it was admitted or parked.",
    ["deployment"],
    buckets=WAIT_BUCKETS,
)
reservation_ratio = Histogram(
    "headrace_reservation_ratio",
    "Tokens a call really used divided by the tokens admission reserved for it.",
    ["deployment"],
    buckets=RATIO_BUCKETS,
)
in_flight_calls = Gauge(
    "headrace_in_flight_calls", "Provider calls this process is making now.", ["deployment"]
)
webhook_deliveries = Counter(
    "headrace_webhook_deliveries",
    "Webhook POSTs by outcome: delivered, retry (will try again), failed (given up).",
    ["outcome"],
)
leases_recovered = Counter(
    "headrace_leases_recovered", "Running requests whose worker died, found by the sweep and requeued."
)
requests_parked = Counter(
    "headrace_requests_parked",
    "Requests parked in the delay queue: no_room (every deployment busy) or trouble (failing).",
    ["route", "reason"],
)
cache_lookups = Counter(
    "headrace_cache_lookups",
    "Answer cache lookups of routes with a cache, by result: hit, semantic_hit, coalesced (the "
    "answer of an identical request in flight), miss.",
    ["route", "result"],
)
cache_saved = Counter(
    "headrace_cache_saved_usd",
    "What the calls not made cost when their answer was first bought: requests served from the cache "
    "or coalesced, by route and how (cache, semantic_cache, coalesced).",
    ["route", "served_from"],
)
batches_accepted = Counter("headrace_batches_accepted", "Batches accepted, by front door.", ["api"])
requests_accepted = Counter("headrace_requests_accepted", "Requests accepted, by priority.", ["priority"])
anomalies = Counter(
    "headrace_anomalies",
    "Anomaly events raised (one per tenant, feature and kind per cooldown), by kind: spend_rate, "
    "tokens_per_request, request_rate, repeated_prompt.",
    ["kind"],
)


class LabelCap:
    """At most ``limit`` distinct values of one label in this process; later ones read "other"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or ""
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
        return value


class Spend:
    """Tokens and cost by tenant, route, deployment and the attribution tags that are labels."""

    def __init__(
        self, tag_keys: Sequence[str], label_values: int, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.tag_keys = tuple(tag_keys)
        self.registry = registry
        labels = ["tenant", "route", "deployment", *(tag_label(k) for k in self.tag_keys)]
        self._caps = {name: LabelCap(label_values) for name in ("tenant", *self.tag_keys)}
        self.tokens = Counter(
            "headrace_tokens",
            "Tokens of every provider call the ledger recorded: input, output, and cached_input "
            "(the part of input billed at the provider's cache rate).",
            [*labels, "token_type"],
            registry=registry,
        )
        self.cost = Counter(
            "headrace_cost_usd", "Cost of every provider call the ledger recorded.", labels, registry=registry
        )

    def record(
        self,
        *,
        tenant: str,
        route: str,
        deployment: str,
        tags: Mapping[str, object],
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int,
        cost_usd: float | None,
    ) -> None:
        values = [self._caps["tenant"](tenant), route, deployment]
        values += [self._caps[k](_text(tags.get(k))) for k in self.tag_keys]
        self.tokens.labels(*values, "input").inc(input_tokens)
        self.tokens.labels(*values, "output").inc(output_tokens)
        if cached_input_tokens:
            self.tokens.labels(*values, "cached_input").inc(cached_input_tokens)
        self.cost.labels(*values).inc(cost_usd or 0.0)

    def unregister(self) -> None:
        for metric in (self.tokens, self.cost):
            self.registry.unregister(metric)


_spend: Spend | None = None
_spend_lock = threading.Lock()


def spend(tag_keys: Sequence[str], label_values: int) -> Spend:
    """This process's spend counters for these tag keys (rebuilt only if the keys change)."""
    global _spend
    with _spend_lock:
        if _spend is None or _spend.tag_keys != tuple(tag_keys):
            if _spend is not None:
                _spend.unregister()
            _spend = Spend(tag_keys, label_values)
        return _spend


def _text(value: object) -> str:
    return "" if value is None else str(value)


def observe_call(
    *,
    provider: str,
    request_model: str,
    response_model: str | None,
    duration_s: float,
    error_type: str | None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    first_chunk_s: float | None = None,
    chunks: int | None = None,
) -> None:
    """One provider call in the GenAI conventions' terms."""
    genai = ("chat", provider, request_model, response_model or request_model)
    operation_duration.labels(*genai, error_type or "").observe(duration_s)
    if input_tokens is not None:
        token_usage.labels(*genai, "input").observe(input_tokens)
    if output_tokens is not None:
        token_usage.labels(*genai, "output").observe(output_tokens)
    if first_chunk_s is not None:
        time_to_first_chunk.labels(*genai).observe(first_chunk_s)
        if chunks and chunks > 1:
            time_per_output_chunk.labels(*genai).observe(max(0.0, duration_s - first_chunk_s) / (chunks - 1))


def serve(host: str, port: int) -> bool:
    """Serve this process's metrics on ``host:port`` (a worker's /metrics) from a daemon thread.
    False, with the reason logged, when the port cannot be bound: the worker still works, and
    another worker on the same host needs its own port (``--metrics-port``)."""
    import logging

    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        logging.getLogger(__name__).error(
            "metrics not served on %s:%d (%s): give each worker on a host its own "
            "HEADRACE_WORKER_METRICS_PORT / --metrics-port, or 0 to serve none",
            host,
            port,
            exc.strerror or exc,
        )
        return False
    return True
