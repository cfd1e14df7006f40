"""The whole embedded stack on loopback: Redis, the simulator, the API and workers.

``headrace demo`` runs it; the end-to-end tests run it too, with their own database URL.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from db.engine import get_database
from db.migrate import upgrade
from db.tenants import create_api_key
from headrace.embedded import ManagedProcess, free_port, headrace_command, start_redis

SIM_KEY_ENV = "HEADRACE_SIM_API_KEY"

DEFAULT_CONFIG = """\
# Written by headrace for the embedded stack: every deployment points at the local simulator.
[[deployments]]
name = "openai-mini"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/v1"
api_key_env = "{key_env}"
rpm = 5000
tpm = 2000000

[[deployments]]
name = "openai-4o"
provider = "openai"
model = "gpt-4o"
base_url = "{sim}/v1"
api_key_env = "{key_env}"
rpm = 5000
tpm = 2000000

[[deployments]]
name = "claude-haiku"
provider = "anthropic"
model = "claude-3-5-haiku-latest"
base_url = "{sim}"
api_key_env = "{key_env}"
rpm = 4000
itpm = 400000
otpm = 80000

[[deployments]]
name = "claude-sonnet"
provider = "anthropic"
model = "claude-sonnet-4-5"
base_url = "{sim}"
api_key_env = "{key_env}"
rpm = 4000
itpm = 400000
otpm = 80000

[[routes]]
name = "fast"
deployments = ["openai-mini", "claude-haiku"]

[[routes]]
name = "smart"
deployments = ["claude-sonnet", "openai-4o"]
"""


@dataclass
class EmbeddedStack:
    home: Path
    database_url: str | None = None
    config_template: str = DEFAULT_CONFIG
    # A little weather: 3% of calls fail with 500/503/529, so retries show in the bill.
    simulator_args: tuple[str, ...] = (
        "--latency-ms",
        "40",
        "--latency-jitter-ms",
        "30",
        "--fault-rate",
        "0.03",
        "--faults",
        "500,503,529",
    )
    worker_concurrency: int = 16
    workers: int = 1
    with_flower: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[ManagedProcess] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    api_url: str = ""
    simulator_url: str = ""
    flower_url: str = ""
    api_key: str = ""
    redis_port: int = 0
    # Each worker's /metrics, by worker name (each on its own free port).
    worker_metrics_urls: dict[str, str] = field(default_factory=dict)
    # An outside Redis (e.g. a Sentinel group's sentinel:// URL) instead of one of our own.
    redis_url: str | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        logs = self.home / "logs"
        config_path = self.home / "headrace.toml"
        # Every process of the stack carries its config path, so it can be told from others.
        self.env = {"HEADRACE_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
        redis_url = self.redis_url
        if redis_url is None:
            redis_proc, redis_url = start_redis(self.home / "redis", env=self.env)
            self.processes.append(redis_proc)
            self.redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])

        sim_port = free_port()
        self.simulator_url = f"http://127.0.0.1:{sim_port}"
        sim = self._spawn("simulator", ["simulate", "--port", str(sim_port), *self.simulator_args], logs)
        sim.wait_http(f"{self.simulator_url}/_sim/health")

        config_path.write_text(self.config_template.format(sim=self.simulator_url, key_env=SIM_KEY_ENV))
        database_url = self.database_url or f"sqlite:///{self.home / 'headrace.db'}"
        self.env.update(
            {
                "HEADRACE_DATABASE_URL": database_url,
                "HEADRACE_REDIS_URL": redis_url,
                SIM_KEY_ENV: "sk-simulated",
                **self.extra_env,
            }
        )
        upgrade(database_url)
        self.api_key = create_api_key(get_database(database_url), "demo").key

        api_port = free_port()
        self.api_url = f"http://127.0.0.1:{api_port}"
        api = self._spawn("api", ["api", "--port", str(api_port)], logs)
        # Started together, then waited for: each takes seconds to import and connect, and one at a
        # time that added up to most of a four-worker stack's start.
        workers = [self.start_worker(f"worker{index + 1}", wait=False) for index in range(self.workers)]
        for worker in workers:
            _wait_ready(worker)
        if self.with_flower:
            flower_port = free_port()
            self.flower_url = f"http://127.0.0.1:{flower_port}"
            flower = self._spawn("flower", ["flower", "--port", str(flower_port)], logs)
            flower.wait_http(f"{self.flower_url}/healthcheck", timeout_s=60)
        api.wait_http(f"{self.api_url}/readyz", timeout_s=60)

    def start_worker(
        self,
        name: str,
        *,
        concurrency: int | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        metrics_port = free_port()
        self.worker_metrics_urls[name] = f"http://127.0.0.1:{metrics_port}/metrics"
        threads = str(concurrency or self.worker_concurrency)
        args = ["worker", "--concurrency", threads, "--name", f"{name}@%h"]
        proc = self._spawn(name, [*args, "--metrics-port", str(metrics_port)], self.home / "logs", env)
        if wait:
            _wait_ready(proc)
        return proc

    def _spawn(
        self, name: str, args: list[str], logs: Path, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(
            name, headrace_command(*args), log_dir=logs, env={**os.environ, **self.env, **(env or {})}
        )
        self.processes.append(proc)
        return proc

    def restart_redis(self, down_s: float = 0.0) -> None:
        """Stop Redis (it writes its append-only file), wait ``down_s``, and start it again on the
        same port."""
        old = next(p for p in self.processes if p.name.startswith("redis-"))
        old.stop()
        time.sleep(down_s)
        proc, _ = start_redis(self.home / "redis", port=self.redis_port, env=self.env)
        self.processes[self.processes.index(old)] = proc

    def workers_running(self) -> list[ManagedProcess]:
        return [p for p in self.processes if p.name.startswith("worker") and p.alive()]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop everything started: first the processes that need Redis and the simulator, all told
        at once and then waited for together (four workers cost one timeout, not four), then those,
        newest first."""
        needed = ("redis", "simulator")
        users = [p for p in self.processes if not p.name.startswith(needed)]
        for proc in users:
            with suppress(ProcessLookupError):
                proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in users:
            proc.stop(timeout_s=max(0.1, deadline - time.monotonic()))
            self.processes.remove(proc)
        while self.processes:
            self.processes.pop().stop()


def _wait_ready(worker: ManagedProcess) -> None:
    worker.wait_until(lambda: " ready." in worker.log_tail(200), timeout_s=60, what="ready")
