"""Every Redis client Headrace opens is made here, from one URL, whatever stands behind it.

``HEADRACE_REDIS_URL`` is either one server (``redis://``, ``rediss://``, ``unix://``) or a
Sentinel group in kombu's notation, one ``sentinel://`` URL per sentinel joined by ``;``::

    sentinel://:secret@10.0.0.1:26379/0;sentinel://10.0.0.2:26379/0;sentinel://10.0.0.3:26379/0

with the group's name in ``HEADRACE_REDIS_SENTINEL_MASTER`` (``master_name`` in kombu's terms).
The password and database of the first URL are the primary's; ``HEADRACE_REDIS_SENTINEL_PASSWORD``
is the sentinels' own, when they ask for one. The broker reads the same URL through kombu's
``sentinel`` transport (``celery_transport_options``); buckets, leases, breakers and delays through
redis-py's ``Sentinel``. Either asks the sentinels for the primary again when its connection
breaks, so a failover costs each client a reconnection, not a restart.

Buckets, breakers, leases and fallback counts may live apart from the broker, on
``HEADRACE_STATE_REDIS_URL`` (``state_client``): one server, a Sentinel group, or, with
``HEADRACE_STATE_REDIS_CLUSTER=true``, a Redis Cluster named by some of its nodes
(``redis://h1:7000,redis://h2:7000``). Every script there touches the keys of one deployment (one
hash tag, ``broker_config/keys.py``) or one key, so each runs on the node owning its slot. The
broker cannot follow: kombu has no cluster transport, and its delay queue and the housekeeping
locks stay with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlparse

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from broker_config.settings import Settings

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelGroup:
    nodes: list[tuple[str, int]]
    db: int
    password: str | None
    username: str | None


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0] == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelGroup:
    """The sentinels of a ``sentinel://...;sentinel://...`` URL, and the primary's db and credentials."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    nodes = []
    for part in parts:
        parsed = urlparse(part)
        if parsed.scheme != SENTINEL_SCHEME or not parsed.hostname:
            raise ValueError(f"{part!r} is not a sentinel://host:port URL (a group joins them with ';')")
        nodes.append((parsed.hostname, parsed.port or SENTINEL_PORT))
    first = urlparse(parts[0])
    path = first.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database of {parts[0]!r} must be a number, not {path!r}")
    return SentinelGroup(
        nodes=nodes,
        db=int(path or 0),
        password=unquote(first.password) if first.password else None,
        username=unquote(first.username) if first.username else None,
    )


def redis_client(
    url: str, *, master_name: str = "mymaster", sentinel_password: str | None = None, **options: Any
) -> redis.Redis:
    """A client of the Redis that ``url`` names (for a Sentinel group, of its current primary).

    ``options`` are redis-py connection options (timeouts, retry); with Sentinel they apply to the
    primary and, for the timeouts, to the sentinels too."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    group = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {
        key: options[key] for key in ("socket_timeout", "socket_connect_timeout") if key in options
    }
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(group.nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        master_name, db=group.db, password=group.password, username=group.username, **options
    )
    return client


def settings_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the Redis the settings name (``options`` as for ``redis_client``)."""
    return redis_client(
        settings.redis_url,
        master_name=settings.redis_sentinel_master,
        sentinel_password=settings.redis_sentinel_password,
        **options,
    )


def state_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the Redis that holds buckets, breakers, leases and fallback counts (``options``
    as for ``redis_client``): ``HEADRACE_STATE_REDIS_URL``'s, else the broker's."""
    url = settings.state_redis_url
    if not url:
        return settings_client(settings, **options)
    if settings.state_redis_cluster:
        return cluster_client(url, **options)
    return redis_client(
        url,
        master_name=settings.state_redis_sentinel_master or settings.redis_sentinel_master,
        sentinel_password=settings.redis_sentinel_password,
        **options,
    )


def cache_url(settings: Settings) -> str:
    """Where cached answers live: ``HEADRACE_CACHE_REDIS_URL``, else the broker's server with the
    next database index (a server has 16: 0-15; db 15 takes 14). A database shares its server's
    maxmemory-policy, so that default evicts only if the broker's server does (``/readyz`` says)."""
    if settings.cache_redis_url:
        return settings.cache_redis_url
    return ";".join(_next_db(part.strip()) for part in settings.redis_url.split(";") if part.strip())


def _next_db(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme == "unix":
        query = dict(part.split("=", 1) for part in parsed.query.split("&") if "=" in part)
        query["db"] = str(_other_db(int(query.get("db", "0"))))
        return parsed._replace(query="&".join(f"{k}={v}" for k, v in query.items())).geturl()
    db = parsed.path.strip("/")
    return parsed._replace(path=f"/{_other_db(int(db) if db.isdigit() else 0)}").geturl()


def _other_db(db: int) -> int:
    return db + 1 if db < 15 else db - 1


def cache_client(settings: Settings, **options: Any) -> redis.Redis:
    """A client of the Redis that holds cached answers (``cache_url``; ``options`` as for
    ``redis_client``). With ``HEADRACE_STATE_REDIS_CLUSTER`` and no cache URL of its own, the
    cache shares the state cluster: every cache key is one key, valid on any node."""
    if not settings.cache_redis_url and settings.state_redis_url and settings.state_redis_cluster:
        return cluster_client(settings.state_redis_url, **options)
    return redis_client(
        cache_url(settings),
        master_name=settings.redis_sentinel_master,
        sentinel_password=settings.redis_sentinel_password,
        **options,
    )


def cluster_client(urls: str, **options: Any) -> redis.Redis:
    """A Redis Cluster client from some of its nodes (comma-separated ``redis://host:port`` URLs;
    it learns the rest from them). Typed as ``redis.Redis``: ``RedisCluster`` answers every command
    the state keys use with the same signature, so that callers need not know which they hold; the
    one thing it refuses, scripts inside a pipeline, is told by ``is_cluster``."""
    nodes: list[ClusterNode] = []
    credentials: dict[str, Any] = {}
    for part in (p.strip() for p in urls.split(",") if p.strip()):
        parsed = urlparse(part)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise ValueError(f"{part!r} is not a redis://host:port URL of a cluster node")
        nodes.append(ClusterNode(parsed.hostname, parsed.port or 6379))  # type: ignore[no-untyped-call]
        if parsed.password:
            username = unquote(parsed.username) if parsed.username else None
            credentials = {"password": unquote(parsed.password), "username": username}
        if parsed.scheme == "rediss":
            options.setdefault("ssl", True)
    if not nodes:
        raise ValueError("HEADRACE_STATE_REDIS_URL names no cluster node")
    return cast(redis.Redis, RedisCluster(startup_nodes=nodes, **credentials, **options))


def is_cluster(client: redis.Redis) -> bool:
    return isinstance(client, RedisCluster)


def celery_transport_options(url: str, *, master_name: str, sentinel_password: str | None) -> dict[str, Any]:
    """What kombu's redis transport needs beyond the URL (nothing, for a single server)."""
    if not is_sentinel(url):
        return {}
    options: dict[str, Any] = {"master_name": master_name}
    if sentinel_password:
        options["sentinel_kwargs"] = {"password": sentinel_password}
    return options
