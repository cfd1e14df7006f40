"""End-to-end throughput: one batch through the API, Celery workers and the simulator.

    python bench/pipeline.py --requests 2000 --workers 1 --concurrency 32 --latency-ms 50
    python bench/pipeline.py --database-url postgresql+psycopg://user@host/db   # production ledger
    python bench/pipeline.py --workers 8 --concurrency 4 --database-url ... --lock-waits   # hot rows

Prints a Markdown table row: acceptance time, wall time to the batch's end, requests/s,
provider calls, worker CPU seconds (user+system, all worker processes) and CPU ms per request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import LockWaitSampler, cpu_seconds, wait_batch
from headrace.stack import EmbeddedStack


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
    parser.add_argument(
        "--lock-waits",
        action="store_true",
        help="PostgreSQL only: sample how many sessions wait on a row lock while the batch runs",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as home:
        stack = EmbeddedStack(
            Path(home),
            database_url=args.database_url,
            workers=args.workers,
            worker_concurrency=args.concurrency,
            simulator_args=("--latency-ms", str(args.latency_ms)),
        )
        try:
            stack.start()
            workers = [p for p in stack.processes if p.name.startswith("worker")]
            cpu_before = sum(cpu_seconds(p.pid) for p in workers)
            body = workload(args.requests)
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=300
            ) as http:
                sampler = LockWaitSampler(stack.env["HEADRACE_DATABASE_URL"]) if args.lock_waits else None
                started = time.monotonic()
                with sampler or contextlib.nullcontext():
                    response = http.post(
                        "/v1/batches", content=body, headers={"Content-Type": "application/jsonl"}
                    )
                    response.raise_for_status()
                    accepted_s = time.monotonic() - started
                    batch_id = response.json()["id"]
                    view = wait_batch(http, batch_id, timeout_s=args.timeout, poll_s=0.1)
                    wall_s = time.monotonic() - started
                download_started = time.monotonic()
                lines = sum(1 for _ in http.get(f"/v1/batches/{batch_id}/results").iter_lines())
                download_s = time.monotonic() - download_started
            cpu_s = sum(cpu_seconds(p.pid) for p in workers) - cpu_before
            calls = sum(httpx.get(f"{stack.simulator_url}/_sim/stats?records=0").json()["received"].values())
        finally:
            stack.stop()
    done = view["request_counts"]["completed"]
    ledger = "PostgreSQL" if args.database_url else "SQLite"
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
    if sampler is not None:
        print(sampler.summary())


if __name__ == "__main__":
    main()
