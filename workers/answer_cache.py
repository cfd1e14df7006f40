"""Answers served again: which requests may be, the key each is found by, and where answers live.

A request is served from the cache only where its route says so (``cache = "exact"`` or
``"semantic"``) or its own ``headrace_cache`` metadata asks (``on``), and only when a fresh call
could have given the same answer: temperature 0 (unless the route sets ``cache_nondeterministic``),
one completion (unless ``cache_n``), no tools (unless ``cache_tools``). ``headrace_cache: off``
neither reads nor writes; ``refresh`` makes the call and replaces the entry.

The key is a hash of the route and the canonical request body: keys sorted, and the fields that do
not change the answer left out (``NOT_IN_KEY``: who asked, how the answer travels). It is
namespaced by tenant, or shared by every tenant where the route sets ``cache_scope = "global"``.

Answers live in their own Redis (``HEADRACE_CACHE_REDIS_URL``), one key each with its TTL, and
never in the broker's: an LRU policy evicting entries there is the point, and a lost entry only
costs a miss. Every read and write here is best-effort: a cache that fails is a cache that misses.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import redis

from broker_config import keys
from broker_config.deployments import Route
from db.attribution import CACHE_TAG

log = logging.getLogger(__name__)

# Fields that say who asked or how the answer travels, not what it is.
NOT_IN_KEY = frozenset(
    {
        "model",  # the route, which is in the key, names what answers
        "user",
        "metadata",
        "stream",
        "stream_options",
        "store",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    }
)


@dataclass(frozen=True)
class CachePlan:
    """What a run does with the cache: look its answer up (not on ``refresh``), store the answer it
    gets, coalesce with an identical request in flight, and search by meaning too."""

    key: str  # the answer's key, namespaced
    scope: str  # tenant:<name> or global, with the route: what a semantic search may match
    lookup: bool
    coalesce: bool
    semantic: bool
    ttl_s: float
    similarity_threshold: float | None


def plan_for(route: Route, tenant: str, tags: Mapping[str, str], body: Mapping[str, Any]) -> CachePlan | None:
    """The run's plan, or None: no cache for it (the route has none, the request said ``off``, or
    its answer is not one a fresh call would repeat)."""
    asked = tags.get(CACHE_TAG)
    kind = route.cache
    if asked == "off" or (kind == "off" and asked not in ("on", "refresh")):
        return None
    if why_not_cacheable(route, body) is not None:
        return None
    namespace = "global" if route.cache_scope == "global" else f"tenant:{tenant}"
    scope = f"{namespace}:{route.name}"
    return CachePlan(
        key=keys.answer(scope, request_hash(body)),
        scope=scope,
        lookup=asked != "refresh",
        coalesce=route.coalesce and asked != "refresh",
        semantic=kind == "semantic",
        ttl_s=route.cache_ttl_s,
        similarity_threshold=route.similarity_threshold,
    )


def why_not_cacheable(route: Route, body: Mapping[str, Any]) -> str | None:
    """Why a fresh call might answer ``body`` differently (None: it would not, or the route accepts
    that it might)."""
    temperature = body.get("temperature")
    reproducible = (
        isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    )
    if not reproducible and not route.cache_nondeterministic:
        return "temperature is not 0"
    n = body.get("n")
    if isinstance(n, int) and n > 1 and not route.cache_n:
        return "n > 1"
    if (body.get("tools") or body.get("functions")) and not route.cache_tools:
        return "tools"
    return None


def request_hash(body: Mapping[str, Any]) -> str:
    """The canonical body's SHA-256: keys sorted at every depth, ``NOT_IN_KEY`` left out."""
    canonical = {k: v for k, v in body.items() if k not in NOT_IN_KEY}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """An answer as a call gave it, and what that call cost (what a hit saves)."""

    response: dict[str, Any]
    deployment: str
    provider: str
    model: str
    cost_usd: str | None  # Decimal as text; None: no price known
    input_tokens: int
    output_tokens: int

    @property
    def saved_usd(self) -> Decimal:
        return Decimal(self.cost_usd) if self.cost_usd is not None else Decimal(0)


class AnswerCache:
    """Answers by key in the cache Redis; every call is best-effort (a failure reads as a miss)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def get(self, key: str) -> CachedAnswer | None:
        try:
            raw = self.redis.get(key)
        except redis.RedisError as exc:
            log.warning("answer cache not read (%s): a miss", exc)
            return None
        if raw is None:
            return None
        try:
            return CachedAnswer(**json.loads(raw))
        except (TypeError, ValueError) as exc:  # written by another version: a miss, then replaced
            log.warning("answer cache entry %s unreadable (%s): a miss", key, exc)
            return None

    def put(self, key: str, answer: CachedAnswer, ttl_s: float) -> bool:
        try:
            self.redis.set(key, json.dumps(asdict(answer)), px=max(1, int(ttl_s * 1000)))
        except redis.RedisError as exc:
            log.warning("answer not cached (%s)", exc)
            return False
        return True
