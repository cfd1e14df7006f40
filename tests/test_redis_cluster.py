"""Buckets, breakers, leases and fallback counts on a real three-node Redis Cluster
(HEADRACE_STATE_REDIS_URL with HEADRACE_STATE_REDIS_CLUSTER=true), the broker on its own Redis.

Every script there touches one deployment's keys, which share its hash tag, or one key: each runs
whole on the node that owns its slot, and deployments spread over the nodes. The broker cannot
follow (kombu has no cluster transport): it, the delay queue and the housekeeping locks stay on
HEADRACE_REDIS_URL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_lib

from broker_config import keys
from broker_config.bucket_state import read_fallbacks, read_state
from broker_config.deployments import parse_config
from broker_config.redis_clients import cluster_client, is_cluster, state_client
from broker_config.settings import Settings
from headrace.stack import EmbeddedStack
from tests.infra.redis_cluster import RedisClusterGroup, running_redis_cluster
from tests.test_end_to_end import lines, wait_ended
from tests.test_outages import _assert_each_call_once_and_costed, _results
from workers.admission import (
    Bucket,
    BucketPolicy,
    Estimate,
    Ticket,
    admission_charges,
    settle,
    tenant_charges,
)
from workers.breaker import BreakerPolicy, FallbackCounter
from workers.leases import Leases
from workers.metering import Settlement

REQUESTS = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterGroup]:
    with running_redis_cluster(tmp_path_factory.mktemp("cluster")) as group:
        yield group


@pytest.fixture
def client(cluster: RedisClusterGroup) -> Iterator[redis_lib.Redis]:
    client = state_client(Settings(state_redis_url=cluster.url, state_redis_cluster=True), socket_timeout=2)
    client.flushall()  # type: ignore[no-untyped-call]
    yield client
    client.close()


def _spread(client: redis_lib.Redis, per_node: int) -> list[str]:
    """Deployment names whose keys land ``per_node`` on each node."""
    chosen: dict[str, list[str]] = {}
    for i in range(1000):
        name = f"dep-{i}"
        node = client.get_node_from_key(keys.bucket(name)).name  # type: ignore[attr-defined]
        if len(chosen.setdefault(node, [])) < per_node:
            chosen[node].append(name)
    assert len(chosen) == 3
    return [name for names in chosen.values() for name in names]


def test_the_state_url_names_a_cluster_by_some_of_its_nodes(cluster: RedisClusterGroup) -> None:
    client = cluster_client(cluster.url.split(",")[0])  # one node is enough: it tells the rest
    assert is_cluster(client) and len(client.get_primaries()) == 3  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not a redis://host:port URL"):
        cluster_client("sentinel://127.0.0.1:26379")
    assert not is_cluster(redis_lib.Redis())


def test_every_bucket_script_runs_whole_on_the_node_that_owns_its_deployment(
    client: redis_lib.Redis, cluster: RedisClusterGroup
) -> None:
    """Take (with a tenant ceiling and the breaker), settle (counting the call in the breaker) and
    the people's read, on deployments spread over the three nodes; then a deployment's breaker
    opens on its failures, and its takes take nothing. Each deployment's keys sit on one node."""
    names = _spread(client, per_node=2)
    config = parse_config(
        "".join(
            f'[[deployments]]\nname = "{n}"\nprovider = "openai"\nmodel = "gpt-4o-mini"\n'
            f'base_url = "http://127.0.0.1:9/v1"\napi_key_env = "K"\nrpm = 600\ntpm = 600000\n'
            for n in names
        )
        + '[[tenants]]\nname = "acme"\nrpm = 300\ntpm = 300000\n',
        Path("cluster.toml"),
    )
    breaker = BreakerPolicy(min_calls=3, consecutive_failures=3)
    bucket = Bucket(client, BucketPolicy(), breaker=breaker)
    estimate = Estimate(prompt_tokens=200, output_tokens=100)
    tenant = config.tenant_limits("acme")
    for deployment in config.deployments:
        charges, ceiling = admission_charges(deployment, estimate), tenant_charges(tenant, estimate)
        for i in range(5):
            take = bucket.take(
                deployment.name,
                f"r{i}",
                charges,
                priority="default",
                ttl_s=60,
                tenant="acme",
                tenant_charges=ceiling,
            )
            assert take.status == "granted", take
            ticket = Ticket(deployment, f"r{i}", charges, "acme", ceiling)
            used = Settlement(used={"requests": 1, "tokens": 250}, tenant_used={"requests": 1, "tokens": 250})
            assert settle(bucket, ticket, used, call_id=f"r{i}", failed=False).found
        state = read_state(client, deployment)
        assert state.grants == 5 and state.in_flight_calls == 0
    failing = config.deployments[0]
    for i in range(3):
        bucket.take(failing.name, f"f{i}", admission_charges(failing, estimate), priority="default", ttl_s=60)
        ticket = Ticket(failing, f"f{i}", admission_charges(failing, estimate), None, [])
        transition = settle(bucket, ticket, Settlement(used={}), call_id=f"f{i}", failed=True).transition
    assert transition == "opened"
    shut = bucket.take(failing.name, "x", admission_charges(failing, estimate), priority="default", ttl_s=60)
    assert shut.status == "open"

    FallbackCounter(client).activated("fast", names[1])
    assert read_fallbacks(client) == {"fast": {names[1]: 1}}
    where = cluster.keys_by_node()
    for name in names:
        holding = [port for port, held in where.items() if any(f"{{{name}}}" in key for key in held)]
        assert len(holding) == 1, f"the keys of {name} are on one node, not {holding}"
    assert all(any(key.startswith("headrace:{") for key in held) for held in where.values())


def test_budgets_are_reserved_on_their_tenants_node_just_before_the_take(client: redis_lib.Redis) -> None:
    """A tenant's budget keys hash to another slot than a deployment's: on a cluster they are
    reserved by a script of their own first, and given back when the take does not grant."""
    from broker_config.budget_state import read_counts
    from workers.bucket import BudgetCharge

    names = _spread(client, per_node=1)
    spend = keys.budget_spend("ten_1", "bud_1", "2026-12")
    expiry = keys.budget_expiry("ten_1", "bud_1", "2026-12")
    client.hset(spend, "spent", "0")
    budget = BudgetCharge(spend, expiry, "monthly", 1.0, 0.4, 30.0, 3_600_000)
    bucket = Bucket(client, BucketPolicy())
    estimate = Estimate(prompt_tokens=10, output_tokens=10)
    tiny = parse_config(
        f'[[deployments]]\nname = "{names[0]}"\nprovider = "openai"\nmodel = "m"\nrpm = 1\ntpm = 600000\n',
        Path("cluster.toml"),
    ).deployments[0]
    charges = admission_charges(tiny, estimate)
    first = bucket.take(tiny.name, "a", charges, priority="default", ttl_s=60, budgets=(budget,))
    second = bucket.take(tiny.name, "b", charges, priority="default", ttl_s=60, budgets=(budget,))
    assert (first.status, second.status) == ("granted", "wait")  # the deployment's one request a minute
    [count] = read_counts(client, [(spend, expiry)])
    assert (count.spent, count.held) == (0.0, pytest.approx(0.4))  # b's reservation was given back
    bucket.settle_budgets((budget,), "a", 0.1)
    other = names[1]
    wide = admission_charges(
        parse_config(
            f'[[deployments]]\nname = "{other}"\nprovider = "openai"\nmodel = "m"\nrpm = 600\ntpm = 600000\n',
            Path("cluster.toml"),
        ).deployments[0],
        estimate,
    )
    statuses = [
        bucket.take(other, f"c{i}", wide, priority="default", ttl_s=60, budgets=(budget,)).status
        for i in range(3)
    ]
    assert statuses == ["granted", "granted", "budget"]  # 0.1 spent + 2 x 0.4 held; a third would pass 1.0


def test_leases_refresh_release_and_are_read_across_nodes(client: redis_lib.Redis) -> None:
    """Lease keys spread over the nodes (one slot each): the keeper refreshes them one call each
    (a cluster refuses scripts inside a pipeline), and a sweep reads many at once."""
    leases = Leases(client, ttl_s=5)
    held = [leases.acquire(f"req-{i}") for i in range(30)]
    assert all(held) and leases.acquire("req-0") is None
    assert leases.refresh() == 30
    assert client.pttl(keys.lease("req-7")) > 4000
    holders = leases.holders([f"req-{i}" for i in range(40)])
    assert sum(token is not None for token in holders.values()) == 30
    first = held[0]
    assert first is not None
    leases.release(first)
    assert client.get(keys.lease("req-0")) is None
    client.set(keys.lease("req-1"), "someone-else")
    assert leases.refresh() == 28  # req-1 was taken over: marked lost, not refreshed
    assert held[1] is not None and held[1].lost


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, cluster: RedisClusterGroup) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("cluster-stack"),
        workers=2,
        worker_concurrency=8,
        extra_env={"HEADRACE_STATE_REDIS_URL": cluster.url, "HEADRACE_STATE_REDIS_CLUSTER": "true"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_pool_with_its_state_on_a_cluster_runs_every_request_once(
    stack: EmbeddedStack, cluster: RedisClusterGroup, http: httpx.Client
) -> None:
    """The whole pool, buckets and leases on the cluster: every request ends once, every call
    costed; the broker's Redis holds no bucket, breaker or lease key, the cluster holds them."""
    batch = http.post("/v1/batches", json={"requests": lines(REQUESTS, "cl", ("fast", "smart"))}).json()["id"]
    view = wait_ended(http, [batch], timeout_s=180)[batch]
    assert view["status"] == "completed", view
    results = _results(http, batch)
    assert sorted(r["custom_id"] for r in results) == sorted(f"cl-{i}" for i in range(REQUESTS))
    assert all(r["status"] == "succeeded" for r in results)
    _assert_each_call_once_and_costed(stack, [batch])
    broker = redis_lib.Redis.from_url(stack.env["HEADRACE_REDIS_URL"])
    assert not [k for k in broker.keys("headrace:*") if k.startswith((b"headrace:{", b"headrace:lease:"))]
    on_cluster = [key for held in cluster.keys_by_node().values() for key in held]
    assert any(key.endswith(":bucket") for key in on_cluster)
    deployments = http.get("/v1/deployments").json()["data"]
    assert sum(d["grants"] for d in deployments) >= REQUESTS
