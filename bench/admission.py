"""How many admissions one Redis takes per second: what every worker does around each provider call,
without the call.

Each admission is the worker's own code path on a real redis-server (started here, on a free
loopback port): the bucket take, which asks the deployment's breaker in the same step
(``bucket_take.lua``: every limit of an OpenAI deployment and a tenant ceiling), then the
settlement with the answer's rate-limit headers, which counts the call in the breaker
(``bucket_settle.lua``): two scripts, two round trips. --processes worker-like processes run
--threads threads each, spread over --deployments deployments (one bucket hash each), with limits
high enough that nobody waits: this measures the scripts and the round trips, not the limiter.

Reports admissions/s, the mean and p99 of one admission (both round trips), and Redis's own
CPU per admission (INFO cpu), which says how far one Redis core goes. With --learn the deployments
are Anthropic ones with ``learn_output``: each admission reserves the route's learned output
(read once per refresh, not per call) and each settlement pushes its sample.

    python bench/admission.py --processes 2 --threads 8 --seconds 10
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_config.deployments import Deployment, TenantLimits, parse_config
from headrace.embedded import start_redis
from workers.admission import (
    Bucket,
    BucketPolicy,
    Estimate,
    Ticket,
    admit,
    estimate_call,
    settle,
    settlement,
)
from workers.breaker import BreakerPolicy
from workers.providers.base import ProviderReply, Usage

DEPLOYMENT = """
[[deployments]]
name = "bench-{i}"
provider = "openai"
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "BENCH_KEY"
rpm = 100000000
tpm = 100000000000
"""
LEARNING = """
[[deployments]]
name = "bench-{i}"
provider = "anthropic"
model = "claude-haiku-4-5"
base_url = "http://127.0.0.1:9"
api_key_env = "BENCH_KEY"
rpm = 100000000
itpm = 100000000000
otpm = 100000000000
learn_output = true
"""
BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Classify this sentence as positive or negative."}],
    "max_tokens": 16,
}
HEADERS = {
    "x-ratelimit-limit-requests": "100000000",
    "x-ratelimit-remaining-requests": "99999990",
    "x-ratelimit-reset-requests": "1ms",
    "x-ratelimit-limit-tokens": "100000000000",
    "x-ratelimit-remaining-tokens": "99999999000",
    "x-ratelimit-reset-tokens": "1ms",
}


REPLY = ProviderReply(body={}, usage=Usage(20, 5), http_status=200, headers=HEADERS)
TENANT = TenantLimits(name="acme", rpm=100_000_000, tpm=100_000_000_000)


def _take(bucket: Bucket, deployment: Deployment, estimate: Estimate) -> Ticket:
    """The worker's own admission (``admit``), for a default-priority request of a tenant."""
    ticket = admit(
        bucket,
        deployment,
        estimate,
        request_id=uuid.uuid4().hex,
        priority="default",
        tenant=TENANT,
        max_inline_wait_s=0,
        sleep=time.sleep,
    )
    assert isinstance(ticket, Ticket), ticket
    return ticket


def _settle(bucket: Bucket, ticket: Ticket, estimate: Estimate) -> None:
    """The worker's settlement of a call that succeeded, counted in the breaker too."""
    answer = settlement(ticket.deployment, estimate, REPLY)
    settle(bucket, ticket, answer, call_id=ticket.reservation_id, failed=False)


def _worker(
    url: str,
    deployments: int,
    threads: int,
    seconds: float,
    learn: bool,
    out: multiprocessing.Queue,  # type: ignore[type-arg]
) -> None:
    import threading

    client = redis.Redis.from_url(url)
    template = LEARNING if learn else DEPLOYMENT
    config = parse_config("".join(template.format(i=i) for i in range(deployments)), Path("bench.toml"))
    bucket = Bucket(client, BucketPolicy(), breaker=BreakerPolicy())
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(index: int) -> None:
        deployment = config.deployments[index % deployments]
        estimate = estimate_call(deployment, BODY, 256)
        mine = []
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            ticket = _take(bucket, deployment, estimate)
            _settle(bucket, ticket, estimate)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    out.put(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--deployments", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--learn", action="store_true", help="Anthropic deployments with learn_output")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="headrace-admission-") as home:
        proc, url = start_redis(Path(home), appendonly=True)
        try:
            client = redis.Redis.from_url(url)
            per_script = _per_script(client, args.learn)
            cpu_before = _redis_cpu(client)
            out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            workers = [
                multiprocessing.Process(
                    target=_worker, args=(url, args.deployments, args.threads, args.seconds, args.learn, out)
                )
                for _ in range(args.processes)
            ]
            started = time.monotonic()
            for worker in workers:
                worker.start()
            latencies = [x for _ in workers for x in out.get()]
            for worker in workers:
                worker.join()
            elapsed = time.monotonic() - started
            redis_cpu = _redis_cpu(client) - cpu_before
        finally:
            proc.stop()
    n = len(latencies)
    latencies.sort()
    print(
        f"{args.processes} processes x {args.threads} threads, {args.deployments} deployments, "
        f"{args.seconds:.0f} s: {n:,} admissions, {n / elapsed:,.0f}/s; one admission (2 round trips) "
        f"mean {statistics.mean(latencies) * 1000:.2f} ms, p99 {latencies[int(n * 0.99)] * 1000:.2f} ms; "
        f"Redis CPU {redis_cpu / n * 1e6:.0f} us per admission"
    )
    print(
        "Redis CPU per call, one client, one after another: "
        + ", ".join(f"{name} {us:.0f} us" for name, us in per_script.items())
    )


def _per_script(client: redis.Redis, learn: bool, n: int = 2000) -> dict[str, float]:
    """Redis's own CPU for each step of an admission, and for a PING (the floor of a round trip)."""
    config = parse_config((LEARNING if learn else DEPLOYMENT).format(i="solo"), Path("bench.toml"))
    deployment = config.deployments[0]
    bucket = Bucket(client, BucketPolicy(), breaker=BreakerPolicy())
    estimate = estimate_call(deployment, BODY, 256)
    tickets: list[Ticket] = []

    def take() -> None:
        tickets.append(_take(bucket, deployment, estimate))

    def settle_one() -> None:
        _settle(bucket, tickets.pop(), estimate)

    def ping() -> None:
        client.ping()

    steps: dict[str, Callable[[], None]] = {"PING": ping, "bucket_take": take, "bucket_settle": settle_one}
    costs = {}
    for name, step in steps.items():
        before = _redis_cpu(client)
        for _ in range(n):
            step()
        costs[name] = (_redis_cpu(client) - before) / n * 1e6
    return costs


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


if __name__ == "__main__":
    main()
