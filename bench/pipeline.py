"""End-to-end throughput: one batch through the API, Celery workers and the simulator.

    python bench/pipeline.py --requests 2000 --workers 1 --concurrency 32 --latency-ms 50
    python bench/pipeline.py --database-url postgresql+psycopg://user@host/db   # production ledger
    python bench/pipeline.py --workers 8 --concurrency 4 --database-url ... --lock-waits   # hot rows
    python bench/pipeline.py --requests 400 --stream   # every deployment stream = true: its CPU cost
    python bench/pipeline.py --observability off      # metrics, logs, traces: all | default | off

Prints a Markdown table row: acceptance time, wall time to the batch's end, requests/s,
provider calls, worker CPU seconds (user+system, all worker processes) and CPU ms per request.
Then what each request cost the shared parts, and memory:

- Redis commands and Redis CPU per request (INFO, everything the run did: publishing, Celery's
  receive and acknowledgement, buckets, leases), PostgreSQL commits per request and the most
  connections it had at once (with --database-url);
- each worker's RSS once 10% of the batch is done (warm), at each quarter and at its end;
- the API's RSS while --download-clients clients download the results at once.

    python bench/pipeline.py --requests 100000 --workers 2 --concurrency 16 --limits-x 100 \
        --download-clients 4
    python bench/pipeline.py --requests 4000 --workers 16 --concurrency 8 --latency-ms 200 --limits-x 100 \
        --database-url ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import (
    LockWaitSampler,
    ResourceSampler,
    cpu_seconds,
    cpu_seconds_of,
    postgres_commits,
    redis_counters,
    wait_batch,
)
from headrace.embedded import start_redis
from headrace.stack import DEFAULT_CONFIG, EmbeddedStack


def observability_env(mode: str, sink_url: str) -> dict[str, str]:
    if mode == "off":
        return {"HEADRACE_METRICS_ENABLED": "false", "HEADRACE_LOG_LEVEL": "WARNING"}
    if mode == "all":
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": sink_url}
    return {}


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP receiver on loopback that accepts every export and keeps nothing: what a
    collector costs the workers is the export, not what the collector does with it."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def workload(n: int) -> bytes:
    lines = []
    for i in range(n):
        body = {
            "model": "fast" if i % 2 else "smart",
            "messages": [{"role": "user", "content": f"Request {i}: " + "lorem ipsum " * (i % 50)}],
            "max_tokens": 32 + (i * 7) % 200,
        }
        lines.append(json.dumps({"custom_id": f"r{i}", "body": body}))
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--concurrency", type=int, default=32, help="threads per worker process")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="simulated provider latency")
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--download-clients", type=int, default=1, help="concurrent results downloads")
    parser.add_argument("--keep", default=None, help="run the stack in this directory and keep it (logs)")
    parser.add_argument(
        "--limits-x",
        type=float,
        default=1.0,
        help="multiply the embedded deployments' rate limits (100: the pool's own speed, not the limits)",
    )
    parser.add_argument(
        "--separate-state",
        action="store_true",
        help="buckets, breakers and leases on a second redis-server (HEADRACE_STATE_REDIS_URL): "
        "each Redis's commands and CPU reported apart",
    )
    parser.add_argument(
        "--lock-waits",
        action="store_true",
        help="PostgreSQL only: sample how many sessions wait on a row lock while the batch runs",
    )
    parser.add_argument(
        "--stream",
        action="store_true",
        help="every deployment streams (stream = true): run with and without to compare CPU per request",
    )
    parser.add_argument(
        "--observability",
        choices=("all", "default", "off"),
        default="default",
        help="all: metrics, INFO logs and traces (to a local OTLP sink); default: metrics and INFO logs, "
        "as shipped; off: none of them (metrics disabled, WARNING logs): their cost is the difference",
    )
    args = parser.parse_args()
    config_template = re.sub(
        r"^(rpm|tpm|itpm|otpm) = (\d+)$",
        lambda m: f"{m[1]} = {int(int(m[2]) * args.limits_x)}",
        DEFAULT_CONFIG,
        flags=re.M,
    )
    if args.stream:
        config_template = re.sub(r"^(provider = .*)$", r"\1\nstream = true", config_template, flags=re.M)

    keep = contextlib.nullcontext(args.keep) if args.keep else None
    with keep or tempfile.TemporaryDirectory(prefix="headrace-bench-") as home, otlp_sink() as sink_url:
        state_redis = start_redis(Path(home) / "state-redis") if args.separate_state else None
        extra_env = {"HEADRACE_STATE_REDIS_URL": state_redis[1]} if state_redis else {}
        extra_env.update(observability_env(args.observability, sink_url))
        stack = EmbeddedStack(
            Path(home),
            database_url=args.database_url,
            workers=args.workers,
            worker_concurrency=args.concurrency,
            simulator_args=("--latency-ms", str(args.latency_ms)),
            config_template=config_template,
            extra_env=extra_env,
        )
        try:
            stack.start()
            workers = [p for p in stack.processes if p.name.startswith("worker")]
            api = next(p for p in stack.processes if p.name == "api")
            redis_urls = {"broker": stack.env["HEADRACE_REDIS_URL"]}
            if state_redis:
                redis_urls["state"] = state_redis[1]
            database_url = stack.env["HEADRACE_DATABASE_URL"]
            postgres = database_url if args.database_url else None
            cpu_before = sum(cpu_seconds(p.pid) for p in workers)
            api_cpu_before = cpu_seconds(api.pid)
            postgres_cpu_before = cpu_seconds_of("postgres")
            redis_before = {name: redis_counters(url) for name, url in redis_urls.items()}
            commits_before = postgres_commits(postgres) if postgres else 0
            body = workload(args.requests)
            pids = {p.name: p.pid for p in [*workers, api]}
            with (
                httpx.Client(
                    base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=600
                ) as http,
                ResourceSampler(pids, postgres) as resources,
            ):
                sampler = LockWaitSampler(database_url) if args.lock_waits else None

                def note_progress(view: dict[str, Any]) -> None:
                    # Marks at 10% done ("warm": start-up and first-use allocations behind), then
                    # at each quarter, to tell a plateau from a climb.
                    share = view["request_counts"]["completed"] / max(args.requests, 1)
                    for mark, at in (("warm", 0.10), ("25%", 0.25), ("50%", 0.5), ("75%", 0.75)):
                        if share >= at and mark not in resources.marks:
                            resources.mark(mark)

                started = time.monotonic()
                with sampler or contextlib.nullcontext():
                    response = http.post(
                        "/v1/batches", content=body, headers={"Content-Type": "application/jsonl"}
                    )
                    response.raise_for_status()
                    accepted_s = time.monotonic() - started
                    api_accept_cpu_s = cpu_seconds(api.pid) - api_cpu_before
                    batch_id = response.json()["id"]
                    view = wait_batch(
                        http, batch_id, timeout_s=args.timeout, poll_s=0.1, on_view=note_progress
                    )
                    wall_s = time.monotonic() - started
                cpu_s = sum(cpu_seconds(p.pid) for p in workers) - cpu_before
                api_cpu_s = cpu_seconds(api.pid) - api_cpu_before
                # PostgreSQL's backends come and go with the pools; exited ones are not counted.
                postgres_cpu_s = cpu_seconds_of("postgres") - postgres_cpu_before
                redis_after = {name: redis_counters(url) for name, url in redis_urls.items()}
                commits = postgres_commits(postgres) - commits_before if postgres else 0
                resources.mark("ended")
                download_s, lines = _download(http, batch_id, args.download_clients)
                resources.mark("downloaded")
            calls = sum(httpx.get(f"{stack.simulator_url}/_sim/stats?records=0").json()["received"].values())
        finally:
            stack.stop()
            if state_redis:
                state_redis[0].stop()
    done = view["request_counts"]["completed"]
    ledger = "PostgreSQL" if args.database_url else "SQLite"
    if args.stream:
        ledger += ", streamed"
    ledger += f", observability {args.observability}"
    print(
        "| ledger | requests | workers x threads | provider latency | accept | wall | req/s | calls "
        "| worker CPU | CPU/request | results download |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {ledger} | {done}/{args.requests} ({lines} lines) | {args.workers} x {args.concurrency} "
        f"| {args.latency_ms:.0f} ms | {accepted_s:.2f} s | {wall_s:.1f} s | {done / wall_s:.0f} | {calls} "
        f"| {cpu_s:.1f} s | {cpu_s / max(done, 1) * 1000:.1f} ms | {download_s:.2f} s |"
    )
    timings = [(name, view["usage"].get(name)) for name in ("latency_ms", "first_chunk_ms", "generation_ms")]
    print(
        "Provider calls (p50/p95): "
        + ", ".join(f"{name} {t['p50']:.0f}/{t['p95']:.0f}" for name, t in timings if t)
    )
    if sampler is not None:
        print(sampler.summary())
    per = max(done, 1)
    for name in redis_urls:
        (calls_before, cpu_before_s, bytes_before), (calls_after, cpu_after_s, bytes_after) = (
            redis_before[name],
            redis_after[name],
        )
        by_command = {command: n - calls_before.get(command, 0) for command, n in calls_after.items()}
        commands = sum(by_command.values())
        top = sorted(by_command.items(), key=lambda item: -item[1])[:10]
        cpu_us = (cpu_after_s - cpu_before_s) / per * 1e6
        print(
            f"Redis ({name}): {commands / per:.1f} commands, {cpu_us:.0f} us of CPU and "
            f"{(bytes_after - bytes_before) / per / 1024:.1f} KiB in and out per request "
            f"({commands / wall_s:,.0f} commands/s); per request: "
            + ", ".join(f"{command} {n / per:.1f}" for command, n in top)
        )
    if postgres:
        most = max(resources.connections)
        print(
            f"PostgreSQL: {commits / per:.2f} commits and {postgres_cpu_s / per * 1000:.2f} ms of CPU "
            f"per request, at most {most} connections"
        )
    print(
        f"API: {api_accept_cpu_s / max(args.requests, 1) * 1e6:.0f} us of CPU per request to accept, "
        f"{api_cpu_s / max(args.requests, 1) * 1e6:.0f} us until the batch ended (publishing after the "
        "answer and the polls included)"
    )
    for worker in workers:
        warm = resources.rss_of(worker.name, since="warm", until="ended")
        if warm:
            quarters = ", ".join(
                f"{resources.rss_of(worker.name, since=mark)[0]:.0f} at {mark}"
                for mark in ("25%", "50%", "75%")
                if mark in resources.marks
            )
            print(
                f"{worker.name} RSS (MB): {warm[0]:.0f} warm (10% done), {quarters}, {warm[-1]:.0f} at the "
                f"end; at most {max(warm):.0f}"
            )
    before, during = resources.rss_of("api", until="ended"), resources.rss_of("api", since="ended")
    print(
        f"API RSS: {before[-1]:.0f} MB before the downloads, at most {max(during or before):.0f} MB while "
        f"{args.download_clients} client(s) downloaded {lines:,} lines in {download_s:.1f} s"
    )


def _download(http: httpx.Client, batch_id: str, clients: int) -> tuple[float, int]:
    """``clients`` downloads of the batch's results at once, streamed; the wall time and the lines
    of one."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> int:
        with http.stream("GET", f"/v1/batches/{batch_id}/results") as response:
            return sum(1 for _ in response.iter_lines())

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(one, range(clients)))
    return time.monotonic() - started, counts[0]


if __name__ == "__main__":
    main()
