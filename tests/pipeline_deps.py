"""What the in-process pipeline tests run requests with: ``Deps`` on a real Redis and ledger, the
deployments file given as text, no publishing (the broker is not under test there)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis as redis_lib

from broker_config.celery_app import configure
from broker_config.deployments import parse_config
from broker_config.settings import Settings
from db.engine import Database
from workers.admission import Bucket
from workers.breaker import BreakerPolicy, FallbackCounter
from workers.delays import DelayQueue
from workers.leases import Leases
from workers.pipeline import Deps
from workers.providers import default_adapters

UNPUBLISHED = "redis://127.0.0.1:1/0"


def pipeline_deps(
    db: Database,
    config: str,
    client: redis_lib.Redis,
    *,
    broker_url: str = UNPUBLISHED,
    sleep: Callable[[float], None] = lambda _s: None,
    **settings: Any,
) -> Deps:
    """``Deps`` for ``run_request`` in the test's own process; ``settings`` override the defaults."""
    configure(Settings(redis_url=broker_url))
    chosen = Settings(
        database_url=db.url, **({"redis_url": broker_url} if broker_url != UNPUBLISHED else {}), **settings
    )
    return Deps(
        db=db,
        config=parse_config(config, Path("t.toml")),
        settings=chosen,
        adapters=default_adapters(),
        bucket=Bucket(client, breaker=BreakerPolicy()),
        delays=DelayQueue(client),
        leases=Leases(client, chosen.lease_ttl_s),
        fallbacks=FallbackCounter(client),
        worker="test",
        sleep=sleep,
    )
