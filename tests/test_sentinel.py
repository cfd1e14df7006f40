"""Redis behind Sentinel: the primary is SIGKILLed in the middle of a 1,000-request run, Sentinel
promotes the replica, and the pool carries on against it (the broker through kombu's sentinel
transport, buckets, leases, breakers and delays through redis-py's Sentinel client). Every request
ends once, the attempt rows are the simulator's calls one for one, and every call is costed.

Replication is asynchronous: what the primary took in its last moments may be missing on the
replica (queued messages, parked requests, leases, bucket levels). The ledger is what repairs it:
the lost-message sweep publishes again what no queue holds, a lease written back by its keeper
keeps its run, and buckets relearn from the provider's headers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from broker_config.redis_clients import parse_sentinel_url, redis_client
from headrace.stack import EmbeddedStack
from tests.infra.sentinel import MASTER, SentinelGroup, running_sentinel_group
from tests.test_end_to_end import lines, wait_ended
from tests.test_outages import _assert_each_call_once_and_costed, _results

REQUESTS = 1000


def test_a_sentinel_url_names_every_sentinel_and_the_primarys_database() -> None:
    group = parse_sentinel_url("sentinel://:p%40ss@10.0.0.1:26380/2;sentinel://10.0.0.2/2")
    assert group.nodes == [("10.0.0.1", 26380), ("10.0.0.2", 26379)]
    assert (group.db, group.password, group.username) == (2, "p@ss", None)
    with pytest.raises(ValueError, match="not a sentinel://host:port URL"):
        parse_sentinel_url("sentinel://10.0.0.1:26379;redis://10.0.0.2:6379")
    with pytest.raises(ValueError, match="must be a number"):
        parse_sentinel_url("sentinel://10.0.0.1:26379/zero")


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    with running_sentinel_group(tmp_path_factory.mktemp("sentinel")) as group:
        yield group


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, sentinels: SentinelGroup) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("sentinel-stack"),
        redis_url=sentinels.url,
        workers=2,
        worker_concurrency=8,
        simulator_args=("--latency-ms", "60"),
        extra_env={
            "HEADRACE_REDIS_SENTINEL_MASTER": MASTER,
            "HEADRACE_LEASE_TTL_S": "3",
            "HEADRACE_SWEEP_INTERVAL_S": "1",
            "HEADRACE_PUBLISH_GRACE_S": "2",
            "HEADRACE_LOST_MESSAGE_CHECK_S": "5",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.slow
def test_the_primary_killed_mid_run_loses_no_request_and_no_cost(
    stack: EmbeddedStack, sentinels: SentinelGroup, http: httpx.Client
) -> None:
    batch = http.post("/v1/batches", json={"requests": lines(REQUESTS, "ha", ("fast",))}).json()["id"]
    done = 0
    deadline = time.monotonic() + 120
    while done < REQUESTS * 0.3 and time.monotonic() < deadline:
        done = http.get(f"/v1/batches/{batch}").json()["request_counts"]["completed"]
        time.sleep(0.2)
    assert done < REQUESTS * 0.8, "the run ended before the failover could fall in its middle"
    killed_at = time.monotonic()
    sentinels.kill_primary()
    promoted_s = time.monotonic() - killed_at
    print(f"\nprimary killed at {done} of {REQUESTS} done; replica promoted in {promoted_s:.1f} s")
    view = wait_ended(http, [batch], timeout_s=300)[batch]
    print(f"every request ended {time.monotonic() - killed_at:.1f} s after the kill")
    client = redis_client(sentinels.url, master_name=MASTER, socket_timeout=1)
    assert client.get_connection_kwargs()["db"] == 0 and client.ping()
    assert view["status"] == "completed", view
    results = _results(http, batch)
    assert sorted(r["custom_id"] for r in results) == sorted(f"ha-{i}" for i in range(REQUESTS))
    assert all(r["status"] == "succeeded" for r in results), [
        r for r in results if r["status"] != "succeeded"
    ][:3]
    _assert_each_call_once_and_costed(stack, [batch])
