"""How often each route had to fall back to each deployment of its chain (kept in Redis)."""

from __future__ import annotations

import redis

from broker_config import keys


class FallbackCounter:
    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def activated(self, route: str, deployment: str) -> None:
        """The chain of ``route`` moved on to ``deployment`` (not its first) for one request."""
        self.redis.hincrby(keys.fallbacks(), f"{route}|{deployment}", 1)
