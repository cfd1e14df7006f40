"""Every Redis key Headrace writes (besides kombu's own), built in one place.

The keys of one deployment share the hash tag ``{deployment}``, so that the bucket scripts,
which touch several of them at once, stay valid on Redis Cluster.
"""

from __future__ import annotations

PREFIX = "headrace"


def publisher_sweep_lock() -> str:
    """Held by the one worker running the publisher sweep at a time."""
    return f"{PREFIX}:lock:publisher-sweep"


def publishing(batch_id: str) -> str:
    """String with a short TTL: held by the API process publishing a large batch after its answer,
    refreshed chunk by chunk; the publisher sweep leaves that batch's requests alone while it lives."""
    return f"{PREFIX}:publishing:{batch_id}"


def delayed_requests() -> str:
    """Sorted set of requests waiting to be published again: member "priority|id", score ready-at ms."""
    return f"{PREFIX}:delayed"


def bucket(deployment: str) -> str:
    """Hash: a deployment's levels, learned limits, pause, rate factor and counters."""
    return f"{PREFIX}:{{{deployment}}}:bucket"


def reservations(deployment: str) -> str:
    """Hash: reservation id -> what it took, until the call is settled."""
    return f"{PREFIX}:{{{deployment}}}:resv"


def reservation_expiry(deployment: str) -> str:
    """Sorted set: reservation id -> expiry ms (a dead worker's reservation stops counting)."""
    return f"{PREFIX}:{{{deployment}}}:resv-exp"


def tenant_bucket(deployment: str, tenant: str) -> str:
    """Hash: one tenant's own ceiling on one deployment."""
    return f"{PREFIX}:{{{deployment}}}:tenant:{tenant}"


def output_samples(deployment: str, route: str) -> str:
    """List: the real output tokens (per completion) of a route's latest calls on a deployment,
    newest first, capped (workers/output_estimate.py); pushed by the settlement script."""
    return f"{PREFIX}:{{{deployment}}}:outputs:{route}"


def breaker(deployment: str) -> str:
    """Hash: a deployment's circuit breaker state (closed / open / half_open) and probe counts."""
    return f"{PREFIX}:{{{deployment}}}:breaker"


def breaker_waiters(deployment: str) -> str:
    """Sorted set: delayed-queue members parked because this deployment was in trouble or its
    breaker open (score: when they were due); woken when the breaker closes."""
    return f"{PREFIX}:{{{deployment}}}:waiters"


def breaker_calls(deployment: str) -> str:
    """Sorted set: the breaker's window of recent calls (score: time, ms)."""
    return f"{PREFIX}:{{{deployment}}}:breaker-calls"


def breaker_failures(deployment: str) -> str:
    """Sorted set: the failures among them."""
    return f"{PREFIX}:{{{deployment}}}:breaker-failures"


def lease(request_id: str) -> str:
    """String with a short TTL: the token of the run that owns the request, refreshed while it lives."""
    return f"{PREFIX}:lease:{request_id}"


def recovery_sweep_lock() -> str:
    """Held by the one worker looking for requests whose run died, or whose message was lost."""
    return f"{PREFIX}:lock:recovery-sweep"


def lost_message_lock() -> str:
    """Held by the one worker looking for queued requests whose message was lost."""
    return f"{PREFIX}:lock:lost-messages"


def suspects(sweep: str) -> str:
    """Hash: what a sweep has seen in a suspicious state -> first seen (server ms), shared by
    whichever worker runs the sweep next."""
    return f"{PREFIX}:suspects:{sweep}"


def fallbacks() -> str:
    """Hash: "route|deployment" -> times the route's chain fell back to that deployment."""
    return f"{PREFIX}:fallbacks"


def webhook_lock() -> str:
    """Held by the one worker delivering webhooks."""
    return f"{PREFIX}:lock:webhooks"


def retention_lock() -> str:
    """Held by the one worker purging files and results past their retention."""
    return f"{PREFIX}:lock:retention"


def expiry_lock() -> str:
    """Held by the one worker expiring batches past their window."""
    return f"{PREFIX}:lock:expiry"


def anomaly_lock() -> str:
    """Held by the one worker judging spend, tokens and requests against their baselines."""
    return f"{PREFIX}:lock:anomalies"


def anomaly_cursor() -> str:
    """String: the end (epoch ms) of the last interval the anomaly detector judged."""
    return f"{PREFIX}:anomaly:cursor"


def anomaly_window(since_ms: int) -> str:
    """String with a TTL: set once by the run that judges the interval starting at ``since_ms``, so
    that two runs overlapping by mishap never count one interval twice."""
    return f"{PREFIX}:anomaly:window:{since_ms}"


def anomaly_baselines(tenant_id: str) -> str:
    """Hash: a tenant's rolling baselines, ``["signal", feature]`` (JSON) -> their EWMA state."""
    return f"{PREFIX}:anomaly:baselines:{tenant_id}"


def budget_spend(tenant_id: str, budget_id: str, period_start: str) -> str:
    """Hash: one budget's spend in one period (spent, held, each open reservation). The keys of a
    tenant's budgets share the hash tag ``{budget:<tenant>}``: one script reserves against all of
    them at once, on a Redis Cluster too."""
    return f"{PREFIX}:{{budget:{tenant_id}}}:{budget_id}:{period_start}"


def budget_expiry(tenant_id: str, budget_id: str, period_start: str) -> str:
    """Sorted set: that budget's open reservations -> when they expire (ms)."""
    return f"{PREFIX}:{{budget:{tenant_id}}}:{budget_id}:{period_start}:exp"


def budgets_version() -> str:
    """Counter bumped whenever a budget is set or deleted: workers re-read the budgets from the
    ledger when it moves, so that a new budget holds from the next run on, not seconds later."""
    return f"{PREFIX}:budgets:version"


def flight(answer_key: str) -> str:
    """Who leads the call for an answer identical requests wait on: "<request id> <lease token>"."""
    return f"{PREFIX}:flight:{answer_key}"


# The answer cache's keys live in the cache Redis (HEADRACE_CACHE_REDIS_URL), which may evict them.
CACHE_PREFIX = "hrc"


def answer(scope: str, request_hash: str) -> str:
    """A cached answer (workers/answer_cache.py): its scope ("tenant:<name>:<route>" or
    "global:<route>") and its request's canonical hash. One key: valid on any node of a cluster."""
    return f"{CACHE_PREFIX}:ans:{scope}:{request_hash}"


def semantic_index(digest: str, part: str) -> str:
    """One of a semantic index's keys (``vec``, ``map``, ``exp``, ``free``:
    workers/semantic_index.py), all under its scope's hash tag, so its scripts run on a cluster."""
    return f"{CACHE_PREFIX}:sem:{{{digest}}}:{part}"
