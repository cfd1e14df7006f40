"""The budgets' counts in the state Redis, read the same way by the workers (admission's ladder),
the API (``GET /v1/budgets``, refusing new batches) and the CLI. What the counts mean and how
they are kept: ``workers/lua/budget.lua``; reading one counts the reservations that have expired
(``budget_read.lua``), as the next take would."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from broker_config import keys
from broker_config.redis_clients import is_cluster
from broker_config.scripts import BUDGET, lua_source


@dataclass(frozen=True)
class BudgetCount:
    spent: float | None  # None: Redis has no count for the period (lost, or nothing counted yet)
    held: float  # what calls in flight have reserved


def read_counts(client: redis.Redis, key_pairs: Sequence[tuple[str, str]]) -> list[BudgetCount]:
    """Each budget's count, from its (spend hash, reservation expiry) keys: one round trip on one
    Redis node; one per budget on a Redis Cluster (which takes no scripts in a pipeline)."""
    if not key_pairs:
        return []
    script = client.register_script(lua_source("budget_read.lua", BUDGET))
    if is_cluster(client):
        found = [script(keys=list(pair), args=[""]) for pair in key_pairs]
    else:
        pipe = client.pipeline(transaction=False)
        for pair in key_pairs:
            script(keys=list(pair), args=[""], client=pipe)
        found = pipe.execute()
    return [BudgetCount(None if spent is None else float(spent), float(held or 0)) for spent, held in found]


def budgets_changed(client: redis.Redis) -> None:
    """Tell the workers a budget was set or deleted (they re-read them on their next run).
    Best-effort: without it they re-read within ``HEADRACE_BUDGET_REFRESH_S``."""
    with contextlib.suppress(redis.RedisError):
        client.incr(keys.budgets_version())
