"""Answers found by meaning: a small vector index per scope, in the cache Redis, searched with numpy.

A scope is what must match exactly for a semantic hit: the answer cache's scope (tenant namespace,
or ``global``, and route), the hash of the request's non-message parameters
(``workers.semantic_key``) and the embedder (vectors of two models never compare). Each scope has
its own index of four keys under one hash tag, so its scripts stay valid on Redis Cluster
(layout: ``lua/semantic.lua``):

    hrc:sem:{<scope digest>}:vec    string: fixed-size records, an expiry and a vector each
    hrc:sem:{<scope digest>}:map    hash: entry key <-> slot
    hrc:sem:{<scope digest>}:exp    sorted set: entry key -> expiry (ms, Redis time)
    hrc:sem:{<scope digest>}:free   set: empty slots

An entry points at an answer key of ``workers.answer_cache``; the index never holds answers.
``add`` (``lua/semantic_add.lua``) writes an entry into a free slot, drops expired entries and, at
``max_entries``, evicts those closest to expiry. ``nearest`` reads every record in one round trip
as one string (``lua/semantic_read.lua``) and scores the live ones with one matrix product; only
when some reach ``min_similarity`` does it look up their entry keys and check that their answers
still exist (the cache Redis evicts answers on its own), removing the entries whose answer is gone.

Measured (bench/semantic_quality.py), the client's CPU decides the cost: a hash of 5,000 vectors
took 15 ms to parse where one string takes 1.7 ms, and numpy converts float16 to float32 about
ten times slower than int8. So a vector is stored as int8 components and one float32 scale
(268 bytes at 256 dimensions, a quarter of float32); similarities move by 0.001 at most
(measured on the pairs of tests/data/semantic_pairs.jsonl).

Like the answer cache, every operation is best-effort: a Redis error reads as a miss.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import redis

from broker_config import keys
from broker_config.scripts import lua_source

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 2000
# Best candidates whose answers are checked in one round trip: beyond the first, they stand in
# for answers the cache Redis evicted before their index entries expired.
CANDIDATES = 3
_LIBRARY = ("semantic.lua",)


@dataclass(frozen=True)
class Scope:
    """What a semantic hit must share with the request: everything but the final question."""

    cache_scope: str  # the answer cache's scope: "tenant:<name>:<route>" or "global:<route>"
    params_hash: str  # workers.semantic_key.SemanticKey.params_hash
    embedder: str  # the Embedder's name

    def digest(self) -> str:
        joined = "\x00".join((self.cache_scope, self.params_hash, self.embedder))
        return hashlib.sha256(joined.encode()).hexdigest()[:32]


def vectors_key(scope: Scope) -> str:
    """String: one record per slot, the entry's expiry (8-byte double, ms; 0 empty) and vector."""
    return keys.semantic_index(scope.digest(), "vec")


def slots_key(scope: Scope) -> str:
    """Hash: 'k:<entry key>' -> slot, 's:<slot>' -> entry key, 'next' -> slots ever used."""
    return keys.semantic_index(scope.digest(), "map")


def expiries_key(scope: Scope) -> str:
    """Sorted set: entry key -> expiry (ms, Redis time); orders pruning and eviction."""
    return keys.semantic_index(scope.digest(), "exp")


def free_slots_key(scope: Scope) -> str:
    """Set: slots emptied and not yet reused."""
    return keys.semantic_index(scope.digest(), "free")


def index_keys(scope: Scope) -> list[str]:
    """The index's keys in the order its scripts take them."""
    return [vectors_key(scope), slots_key(scope), expiries_key(scope), free_slots_key(scope)]


class Match(NamedTuple):
    entry_key: str  # the answer key the entry points at
    similarity: float  # cosine similarity with the query, -1..1


def record_dtype(dim: int) -> np.dtype[Any]:
    """One slot: its expiry (ms; 0 empty), and the vector as int8 components times a scale."""
    return np.dtype([("expiry", "<f8"), ("scale", "<f4"), ("vector", "i1", (dim,))])


def quantized(vector: npt.ArrayLike) -> bytes:
    """A vector as a record stores it, after the expiry the add script writes: its float32 scale
    (the largest component / 127) and its components over that scale, rounded to int8."""
    row = np.asarray(vector, dtype=np.float32).reshape(-1)
    peak = float(np.abs(row).max(initial=0.0))
    scale = peak / 127 if peak > 0 else 1.0
    codes = np.clip(np.rint(row / scale), -127, 127).astype("i1")
    encoded: bytes = np.array([scale], dtype="<f4").tobytes() + codes.tobytes()
    return encoded


class SemanticIndex:
    """Per-scope vector indexes in the cache Redis, each bounded to ``max_entries``."""

    def __init__(self, client: redis.Redis, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.redis = client
        self.max_entries = max_entries
        self._add = client.register_script(lua_source("semantic_add.lua", _LIBRARY))
        self._read = client.register_script(lua_source("semantic_read.lua", _LIBRARY))
        self._remove = client.register_script(lua_source("semantic_remove.lua", _LIBRARY))

    def add(self, scope: Scope, vector: npt.ArrayLike, entry_key: str, ttl_s: float) -> bool:
        """Index ``entry_key`` under ``vector`` for ``ttl_s`` (replacing its earlier vector, if
        any); False when Redis failed."""
        ttl_ms = max(1, int(ttl_s * 1000))
        args: list[str | bytes | int] = [entry_key, quantized(vector), ttl_ms, self.max_entries]
        try:
            self._add(keys=index_keys(scope), args=args)
        except redis.RedisError as exc:
            log.warning("semantic index entry not added (%s)", exc)
            return False
        return True

    def nearest(self, scope: Scope, vector: npt.ArrayLike, min_similarity: float = -1.0) -> Match | None:
        """The live entry most similar to ``vector``, with a similarity of at least
        ``min_similarity``, whose answer still exists; or None."""
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        try:
            now_ms, records = self._load(scope, query.shape[0])
        except redis.RedisError as exc:
            log.warning("semantic index not read (%s): a miss", exc)
            return None
        if records.size == 0:
            return None
        # einsum, not @: a matrix-vector product goes to OpenBLAS, whose threads contend with every
        # worker process on the host (measured: 5,000 rows took 2.7 ms where einsum takes 0.2 ms).
        similarities = np.einsum("ij,j->i", records["vector"].astype(np.float32), query) * records["scale"]
        similarities[records["expiry"] <= now_ms] = -np.inf
        count = min(CANDIDATES, records.size)
        best = np.argpartition(-similarities, count - 1)[:count]
        best = best[np.argsort(-similarities[best])]
        slots = [int(i) for i in best if similarities[i] >= min_similarity]
        if not slots:
            return None
        try:
            candidates = self._live_entries(scope, slots)
        except redis.RedisError as exc:
            log.warning("semantic index candidates not checked (%s): a miss", exc)
            return None
        gone = [key for _, key, alive in candidates if not alive]
        if gone:
            self.remove(scope, *gone)
        for slot, key, alive in candidates:
            if alive:
                return Match(key, float(similarities[slot]))
        return None

    def remove(self, scope: Scope, *entry_keys: str) -> int:
        """Forget entries (their answers are gone); the number removed, 0 when Redis failed."""
        if not entry_keys:
            return 0
        try:
            removed = self._remove(keys=index_keys(scope), args=list(entry_keys))
        except redis.RedisError as exc:
            log.warning("semantic index entries not removed (%s)", exc)
            return 0
        return int(removed)

    def size(self, scope: Scope) -> int:
        """Entries held, the expired but not yet pruned included."""
        return int(self.redis.zcard(expiries_key(scope)))

    def _load(self, scope: Scope, dim: int) -> tuple[float, npt.NDArray[np.void]]:
        now, raw = self._read(keys=[vectors_key(scope)])
        record = record_dtype(dim)
        usable = len(raw) - len(raw) % record.itemsize if raw else 0
        return float(now), np.frombuffer(raw or b"", dtype=record, count=usable // record.itemsize)

    def _live_entries(self, scope: Scope, slots: list[int]) -> list[tuple[int, str, bool]]:
        """(slot, entry key, whether its answer exists) for the slots that still hold an entry."""
        keys = self.redis.hmget(slots_key(scope), [f"s:{slot}" for slot in slots])
        held = [(slot, _text(key)) for slot, key in zip(slots, keys, strict=True) if key is not None]
        if not held:
            return []
        # One EXISTS per key: on Redis Cluster answer keys live in other slots than the index.
        with self.redis.pipeline(transaction=False) as pipe:
            for _, key in held:
                pipe.exists(key)
            alive = pipe.execute()
        return [(slot, key, bool(n)) for (slot, key), n in zip(held, alive, strict=True)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
