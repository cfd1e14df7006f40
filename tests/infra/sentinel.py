"""A Redis Sentinel group on loopback, from the same redis-server binary the suite uses: a primary,
one replica and three sentinels (quorum 2) that notice a dead primary within a second."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from headrace.embedded import ManagedProcess, free_port, redis_server_binary, start_redis

MASTER = "headrace"
DOWN_AFTER_MS = 1000


@dataclass
class SentinelGroup:
    home: Path
    primary: ManagedProcess | None = None
    replica: ManagedProcess | None = None
    sentinels: list[ManagedProcess] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)
    primary_port: int = 0
    replica_port: int = 0

    @property
    def url(self) -> str:
        return ";".join(f"sentinel://127.0.0.1:{port}/0" for port in self.sentinel_ports)

    def start(self) -> None:
        self.primary, url = start_redis(self.home / "primary")
        self.primary_port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.replica, url = start_redis(
            self.home / "replica", extra_args=["--replicaof", "127.0.0.1", str(self.primary_port)]
        )
        self.replica_port = int(url.rsplit(":", 1)[1].split("/")[0])
        for index in range(3):
            port = free_port()
            directory = self.home / f"sentinel{index}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"  # sentinels rewrite their file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            proc = ManagedProcess(
                f"sentinel-{port}", [redis_server_binary(), str(conf), "--sentinel"], log_dir=directory
            )
            self.sentinels.append(proc)
            self.sentinel_ports.append(port)
        self._wait_settled(self.primary_port, timeout_s=30)

    def _wait_settled(self, primary_port: int, timeout_s: float) -> None:
        """Until every sentinel names ``primary_port`` as the primary and knows a replica of it
        that is in sync, and the other two sentinels."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._settled(port, primary_port) for port in self.sentinel_ports):
                return
            time.sleep(0.2)
        raise AssertionError(f"the sentinels did not settle on 127.0.0.1:{primary_port} in {timeout_s}s")

    def _settled(self, sentinel_port: int, primary_port: int) -> bool:
        with contextlib.suppress(redis.RedisError):
            client = redis.Redis(port=sentinel_port, socket_timeout=1, decode_responses=True)
            with client:
                address = client.sentinel_get_master_addr_by_name(MASTER)
                replicas = client.sentinel_slaves(MASTER)
                others = client.sentinel_sentinels(MASTER)
            healthy = [r for r in replicas if not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])]
            return bool(address) and int(address[1]) == primary_port and bool(healthy) and len(others) == 2
        return False

    def kill_primary(self) -> None:
        """SIGKILL the primary, as a lost machine would, and wait for the replica's promotion."""
        assert self.primary is not None
        self.primary.kill()
        self.primary = None
        self._wait_promoted(timeout_s=30)

    def _wait_promoted(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, ValueError):
                client = redis.Redis(port=self.sentinel_ports[0], socket_timeout=1, decode_responses=True)
                with client:
                    address = client.sentinel_get_master_addr_by_name(MASTER)
                if address and int(address[1]) == self.replica_port:
                    return
            time.sleep(0.1)
        raise AssertionError(f"the replica was not promoted within {timeout_s}s")

    def stop(self) -> None:
        for proc in [*self.sentinels, self.replica, self.primary]:
            if proc is not None:
                proc.stop()


@contextlib.contextmanager
def running_sentinel_group(home: Path) -> Iterator[SentinelGroup]:
    group = SentinelGroup(home)
    try:
        group.start()
        yield group
    finally:
        group.stop()
