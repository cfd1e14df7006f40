"""How close to a provider's TPM limit the pool runs, and how many 429s it takes to get there.

The same seeded workload (varied prompt and output sizes) against the simulator's OpenAI dialect at
a given RPM/TPM, run several ways:

  headrace-1       Headrace, 1 worker process x C threads
  headrace-4       Headrace, 4 worker processes x C/4 threads
  naive            asyncio + the official SDK (its own retries: 2, honouring retry-after), C at once
  headrace-4-2x    Headrace, 4 processes, deployments file claiming twice the real TPM

    python bench/rate_limits.py --requests 1500 --tpm 100000 --rpm 5000 --concurrency 16

Reports per run: achieved tokens/minute in steady state as a fraction of the TPM limit, 429s,
requests lost, wall time, worker CPU seconds; and the prompt estimate's error on the workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds, wait_batch
from headrace.simulator.config import SimConfig
from headrace.simulator.server import running_simulator
from headrace.stack import EmbeddedStack
from workers.admission import estimate_prompt_tokens

VOCABULARY = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "will",
    "more",
    "about",
    "can",
    "out",
    "other",
    "headrace",
    "waterwheel",
    "millpond",
    "sluicegate",
    "1848",
    "2026",
    "42",
    "turbine",
    "throughput,",
    "latency;",
    "reliability:",
    "(backoff)",
    "idempotency-keyed",
    "rate-limited",
    "re-queued",
    "JSON_lines",
    "multi-provider",
]

CONFIG = """
[[deployments]]
name = "openai-mini"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = {rpm}
tpm = {tpm}

[[routes]]
name = "bench"
deployments = ["openai-mini"]
"""


def workload(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choices(VOCABULARY, k=rng.randint(10, 300)))
        body = {
            "model": "bench",
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}],
            "max_tokens": rng.choice([16, 64, 128, 256, 512]),
        }
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def steady_fraction(records: list[dict[str, Any]], tpm: int) -> float:
    """Tokens processed per minute, as a fraction of the limit, once the initial full bucket is
    discounted: (tokens of every answered call - one minute's limit) / (limit x minutes from the
    first admission to the last). A lower bound: the stock the bucket ends with is not counted."""
    done = [(r["t"], r["input_tokens"] + r["output_tokens"]) for r in records if r["status"] == 200]
    minutes = (max(t for t, _ in done) - min(t for t, _ in done)) / 60
    return (sum(tokens for _, tokens in done) - tpm) / (tpm * minutes)


def sim_args(args: argparse.Namespace) -> tuple[str, ...]:
    return (
        "--latency-ms",
        str(args.latency_ms),
        "--latency-jitter-ms",
        str(args.latency_ms / 2),
        "--rpm",
        str(args.rpm),
        "--tpm",
        str(args.tpm),
        "--max-output-tokens",
        "300",
        "--seed",
        str(args.seed),
    )


def run_headrace(
    args: argparse.Namespace, lines: list[dict[str, Any]], workers: int, tpm_claimed: int
) -> dict:
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as home:
        stack = EmbeddedStack(
            Path(home),
            config_template=CONFIG.format(rpm=args.rpm, tpm=tpm_claimed),
            workers=workers,
            worker_concurrency=max(1, args.concurrency // workers),
            simulator_args=sim_args(args),
        )
        try:
            stack.start()
            pids = [p.pid for p in stack.processes if p.name.startswith("worker")]
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=300
            ) as http:
                started = time.monotonic()
                batch = http.post("/v1/batches", json={"requests": lines}).raise_for_status().json()["id"]
                wait_batch(http, batch, timeout_s=args.timeout, poll_s=0.5)
                wall = time.monotonic() - started
                results = [json.loads(x) for x in http.get(f"/v1/batches/{batch}/results").iter_lines()]
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
            stats = httpx.get(
                f"{stack.simulator_url}/_sim/stats", params={"records": 20000}, timeout=60
            ).json()
        finally:
            stack.stop()
    ok = [r for r in results if r["status"] == "succeeded"]
    errors = []
    for line, result in zip(lines, results, strict=True):
        if result["status"] == "succeeded":
            true = result["response"]["body"]["usage"]["prompt_tokens"]
            errors.append((estimate_prompt_tokens(line["body"]) - true) / true)
    return {
        "achieved": steady_fraction(stats["records"], args.tpm),
        "429s": stats["answered"]["openai"].get("429", 0),
        "calls": stats["received"]["openai"],
        "lost": len(lines) - len(ok),
        "wall": wall,
        "cpu": cpu,
        "estimate_errors": errors,
    }


async def naive_client(url: str, lines: list[dict[str, Any]], concurrency: int) -> int:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-naive", timeout=60)  # SDK retries: 2
    gate = asyncio.Semaphore(concurrency)
    lost = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal lost
        async with gate:
            try:
                await client.chat.completions.create(**{**body, "model": "gpt-4o-mini"})
            except openai.APIError:
                lost += 1

    await asyncio.gather(*(one(line["body"]) for line in lines))
    await client.close()
    return lost


def run_naive(args: argparse.Namespace, lines: list[dict[str, Any]]) -> dict:
    config = SimConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_ms / 2,
        rpm=args.rpm,
        tpm=args.tpm,
        max_output_tokens=300,
        seed=args.seed,
    )
    with running_simulator(config) as url:
        cpu_before = time.process_time()
        started = time.monotonic()
        lost = asyncio.run(naive_client(url, lines, args.concurrency))
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu_before
        stats = httpx.get(f"{url}/_sim/stats", params={"records": 20000}, timeout=60).json()
    return {
        "achieved": steady_fraction(stats["records"], args.tpm),
        "429s": stats["answered"]["openai"].get("429", 0),
        "calls": stats["received"]["openai"],
        "lost": lost,
        "wall": wall,
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--rpm", type=int, default=5000)
    parser.add_argument("--tpm", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--runs", default="headrace-1,headrace-4,naive,headrace-4-2x")
    args = parser.parse_args()
    lines = workload(args.requests, args.seed)
    runs = {
        "headrace-1": lambda: run_headrace(args, lines, 1, args.tpm),
        "headrace-4": lambda: run_headrace(args, lines, 4, args.tpm),
        "naive": lambda: run_naive(args, lines),
        "headrace-4-2x": lambda: run_headrace(args, lines, 4, 2 * args.tpm),
    }
    print(
        f"{args.requests} requests, limit {args.rpm} RPM / {args.tpm} TPM, concurrency {args.concurrency}, "
        f"simulated latency {args.latency_ms:.0f} ms",
        flush=True,
    )
    print("| run | achieved TPM (steady) | 429s | calls | lost | wall | worker CPU |")
    print("|---|---|---|---|---|---|---|")
    errors: list[float] = []
    for name in args.runs.split(","):
        result = runs[name]()
        errors += result.get("estimate_errors", [])
        print(
            f"| {name} | {result['achieved']:.1%} "
            f"| {result['429s']} ({result['429s'] / result['calls']:.2%}) "
            f"| {result['calls']} | {result['lost']} | {result['wall']:.1f} s | {result['cpu']:.1f} s |",
            flush=True,
        )
    if errors:
        print(
            f"\nprompt estimate vs the simulator's count: mean error {statistics.mean(errors):+.1%}, "
            f"mean |error| {statistics.mean(abs(e) for e in errors):.1%}, "
            f"worst {max(errors, key=abs):+.1%} ({len(errors)} requests)"
        )


if __name__ == "__main__":
    main()
