"""The CPU floor of one request: what the parts our architecture mandates cost, each alone.

    python bench/floor.py [--n 2000] [--warmup 50] [--threads 16] [--idle-s 5] [--no-postgres]

The issue asks whether a worker's CPU per request can be cut to an eighth. Whatever the worker
does of its own, a request must at least pay for the parts we do not get to change: one call
through the official ``openai`` SDK over HTTP, one Celery task on Redis (threads pool, our
configuration: priorities, acks_late, prefetch 1, the same transport options) and about three
ledger transactions. Their sum is a floor: if it is above the target, no optimisation of our own
code reaches it. Measured here, on this machine, in one sitting:

- SDK call: this process's CPU (user+system) per ``chat.completions.create`` against the provider
  simulator at zero latency (a subprocess, its CPU not counted), sequentially and from 16 threads
  sharing one client;
- Celery task: a no-op task's round trip, as the worker subprocess's CPU per task (/proc), from
  after its warm-up to after the last task, minus its idle CPU over the same wall time (idle is
  measured first); the task INCRs a Redis counter so that we know when all ran. Redis's and the
  publisher's CPU are not counted. At the worker's default log level (WARNING) and at INFO, which
  ``headrace worker`` uses;
- ledger write: this process's CPU per ``Database.transact`` of one UPDATE of one request row
  (the worker's START_RUN statement), on SQLite (in-process, so the engine's CPU is counted) and
  on a throwaway PostgreSQL cluster (tests/infra/postgres.py; the server's CPU is shown apart).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import openai
import redis
from celery import Celery
from sqlalchemy.orm import Session

from bench.measure import cpu_seconds, cpu_seconds_of
from broker_config.celery_app import celery_config
from broker_config.queues import queue_for
from broker_config.settings import Settings
from db.engine import Database
from db.migrate import upgrade
from db.models import Batch, LlmRequest, Tenant
from db.types import utcnow
from headrace.embedded import ManagedProcess, start_redis
from headrace.simulator.config import SimConfig
from headrace.simulator.server import running_simulator
from tests.infra.postgres import running_postgres
from workers.ledger_statements import START_RUN

ROOT = Path(__file__).resolve().parent.parent
REDIS_ENV = "HEADRACE_FLOOR_REDIS_URL"
COUNTER = "floor:done"
WAIT_TIMEOUT_S = 300.0
REQUEST_ID = "req_floor"

# The worker runs this module (celery -A bench.floor): our configuration, a no-op task.
_redis_url = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/0")
app = Celery("floor")
app.conf.update(celery_config(Settings(redis_url=_redis_url)))
_counter = redis.Redis.from_url(_redis_url)  # connects on first use


@app.task(name="floor.noop")  # type: ignore[untyped-decorator]
def noop() -> None:
    _counter.incr(COUNTER)


Row = tuple[str, float, int, str]  # part, CPU ms per request, N, note


def sdk_rows(n: int, warmup: int, threads: int) -> list[Row]:
    rows: list[Row] = []
    with running_simulator(SimConfig(latency_ms=0.0)) as url:
        for count in (1, threads):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

            def loop(calls: int, client: openai.OpenAI = client) -> None:
                for _ in range(calls):
                    client.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": "Say hello in five words."}],
                        max_tokens=16,
                    )

            def run(calls: int, count: int = count, loop: Callable[[int], None] = loop) -> float:
                pool = [threading.Thread(target=loop, args=(calls,)) for _ in range(count)]
                start = time.process_time()
                for thread in pool:
                    thread.start()
                for thread in pool:
                    thread.join()
                return time.process_time() - start

            run(max(1, warmup // count))
            per_thread = n // count
            wall = time.monotonic()
            cpu = run(per_thread)
            wall = time.monotonic() - wall
            calls = per_thread * count
            what = "sequential" if count == 1 else f"{count} threads, one client"
            rows.append((f"SDK call ({what})", cpu / calls * 1000, calls, f"{calls / wall:.0f} calls/s"))
            client.close()
    return rows


def _wait_count(client: redis.Redis, target: int, worker: ManagedProcess) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while int(client.get(COUNTER) or 0) < target:
        if time.monotonic() > deadline or not worker.alive():
            raise RuntimeError(f"worker ran {client.get(COUNTER)!r} of {target} tasks:\n{worker.log_tail()}")
        time.sleep(0.02)


def celery_row(redis_url: str, log_dir: Path, args: argparse.Namespace, loglevel: str) -> Row:
    queue, level = queue_for("default")  # as broker_config/publisher.py publishes a default request
    client = redis.Redis.from_url(redis_url)
    client.delete(COUNTER)
    argv = [sys.executable, "-m", "celery", "-A", "bench.floor", "worker", "--pool", "threads"]
    argv += ["--concurrency", str(args.threads), "--queues", "interactive,default,bulk"]
    argv += ["--without-mingle", "--without-gossip", "--loglevel", loglevel]
    env = {
        REDIS_ENV: redis_url,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    worker = ManagedProcess(f"worker-{loglevel.lower()}", argv, log_dir=log_dir, env=env)
    try:
        for _ in range(args.warmup):
            noop.apply_async(queue=queue, priority=level)
        _wait_count(client, args.warmup, worker)
        time.sleep(1.0)  # let the warm-up's acks settle
        cpu, wall = cpu_seconds(worker.pid), time.monotonic()
        time.sleep(args.idle_s)
        idle_rate = (cpu_seconds(worker.pid) - cpu) / (time.monotonic() - wall)
        cpu, wall = cpu_seconds(worker.pid), time.monotonic()
        for _ in range(args.n):
            noop.apply_async(queue=queue, priority=level)
        _wait_count(client, args.warmup + args.n, worker)
        rate = args.n / (time.monotonic() - wall)
        time.sleep(0.5)  # the last tasks' acks
        busy = cpu_seconds(worker.pid) - cpu - idle_rate * (time.monotonic() - wall)
    finally:
        worker.stop(timeout_s=40)
        client.close()
    note = f"idle {idle_rate * 1000:.1f} ms/s subtracted; {rate:.0f} tasks/s"
    return (f"Celery task ({args.threads} threads, loglevel {loglevel})", busy / args.n * 1000, args.n, note)


def _seed(session: Session) -> None:
    now = utcnow()
    session.add(Tenant(id="ten_floor", name="floor", created_at=now))
    session.flush()
    session.add(
        Batch(
            id="bat_floor",
            tenant_id="ten_floor",
            status="in_progress",
            priority="default",
            created_at=now,
            expires_at=now,
            total_count=1,
        )
    )
    session.flush()
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    session.add(
        LlmRequest(
            id=REQUEST_ID,
            batch_id="bat_floor",
            line_no=0,
            custom_id="r0",
            model="gpt-4o-mini",
            body=body,
            priority="default",
            status="queued",
            created_at=now,
        )
    )


def _start_run(session: Session) -> None:
    session.execute(START_RUN, {"b_request_id": REQUEST_ID, "now": utcnow(), "v_lease": "floor-lease"})


def ledger_row(url: str, name: str, n: int, warmup: int) -> Row:
    upgrade(url)
    db = Database(url, pre_ping=False)  # as workers/tasks.py builds its ledger
    try:
        db.transact(_seed)
        for _ in range(warmup):
            db.transact(_start_run)
        server = cpu_seconds_of("postgres")
        wall, start = time.monotonic(), time.process_time()
        for _ in range(n):
            db.transact(_start_run)
        cpu, wall = time.process_time() - start, time.monotonic() - wall
        server = cpu_seconds_of("postgres") - server
    finally:
        db.dispose()
    note = f"{n / wall:.0f} txn/s"
    if name == "PostgreSQL":
        note += f"; server CPU {server / n * 1000:.3f} ms/txn, not counted"
    return (f"Ledger transaction, 1 UPDATE ({name})", cpu / n * 1000, n, note)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="measured calls / tasks / transactions per part")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=16, help="SDK threads; the worker's concurrency")
    parser.add_argument(
        "--idle-s", type=float, default=5.0, help="how long the worker's idle CPU is measured"
    )
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    print("command:", shlex.join(["python", *sys.argv]))
    rows = sdk_rows(args.n, args.warmup, args.threads)
    with tempfile.TemporaryDirectory(prefix="floor-") as tmp:
        broker, redis_url = start_redis(Path(tmp, "redis"))
        try:
            app.conf.update(celery_config(Settings(redis_url=redis_url)))
            rows += [celery_row(redis_url, Path(tmp), args, level) for level in ("WARNING", "INFO")]
        finally:
            broker.stop()
        rows.append(ledger_row(f"sqlite:///{tmp}/ledger.db", "SQLite", args.n, args.warmup))
        if not args.no_postgres:
            with running_postgres() as cluster:
                if cluster is None:
                    print("no PostgreSQL binaries and no HEADRACE_TEST_POSTGRES_URL: SQLite only")
                else:
                    rows.append(ledger_row(f"{cluster.url}/postgres", "PostgreSQL", args.n, args.warmup))
    print("\n| part | CPU per request (ms) | N | note |\n|---|---:|---:|---|")
    for part, ms, count, note in rows:
        print(f"| {part} | {ms:.3f} | {count} | {note} |")
    sdk, task = rows[0][1], rows[2][1]
    for part, ms, _, _ in rows[4:]:
        floor = sdk + task + 3 * ms
        print(
            f"\nfloor ({part.split('(')[-1].rstrip(')')} ledger): 1 sequential SDK call {sdk:.3f} + 1 Celery "
            f"task (WARNING) {task:.3f} + 3 ledger transactions {3 * ms:.3f} = **{floor:.3f} ms** per request"
        )


if __name__ == "__main__":
    main()
