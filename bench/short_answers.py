"""Learned output reservations (``workers/output_estimate.py``): short answers under a large max_tokens.

``python bench/rate_limits.py --workload short-answers`` runs this: --requests requests with
``max_tokens`` 4,096 whose answers are 200 to 400 tokens (the simulator's natural length, uniform,
~300), against one Anthropic-dialect deployment limited to --otpm output tokens per minute (RPM and
ITPM far above what the run needs), --latency-ms +/- half per call, 4 worker processes x
(--concurrency / 4) threads. Runs (--runs): ``learned-off`` reserves max_tokens of OTPM for every
call (the deployment without ``learn_output``), ``learned-on`` the route's learned p99 x 1.2 once
it has 50 answers (``learn_output = true``). With --long-share that share of the answers runs to
max_tokens instead (a debt at each settlement: the learned figure did not reserve it).
--otpm-counts tells the simulator what a call takes from OTPM when it arrives: ``output`` only what
it will produce (a provider counting output as it is generated), ``max_tokens`` its max_tokens
until it ends (api-compat.md 5.4: Anthropic's way).

Prints, per run: requests per minute (succeeded over the span from the first to the last admission
at the provider, and over the wall time from submission to the batch's end), provider 429s as a
share of the calls made, and requests lost (not succeeded). Targets: on clearly more requests per
minute than off, 429s <= 0.5%, none lost.

    python bench/rate_limits.py --workload short-answers --requests 300 --otpm 80000 \\
        --latency-ms 10000 --concurrency 64 --otpm-counts output
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.measure import wait_batch
from headrace.simulator.config import SimConfig
from headrace.simulator.ideal import admission_span
from headrace.stack import EmbeddedStack

MAX_TOKENS = 4096
CONFIG = """
[[deployments]]
name = "claude"
provider = "anthropic"
model = "claude-haiku-4-5"
base_url = "{{sim}}"
api_key_env = "{{key_env}}"
rpm = 100000
itpm = 100000000
otpm = {otpm}
learn_output = {learn}

[[routes]]
name = "bench"
deployments = ["claude"]
"""


def workload(n: int, seed: int, vocabulary: list[str], long_share: float) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choices(vocabulary, k=rng.randint(10, 100)))
        if int((i + 1) * long_share) > int(i * long_share):  # evenly spread; runs to its max_tokens
            text += f" [[sim:output_tokens={MAX_TOKENS}]]"
        body = {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def run(args: argparse.Namespace, lines: list[dict[str, Any]], learn: bool) -> dict[str, Any]:
    sim = SimConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_ms / 2,
        anthropic_rpm=100_000,
        itpm=100_000_000,
        otpm=args.otpm,
        otpm_counts=args.otpm_counts,
        min_output_tokens=200,
        max_output_tokens=400,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as home:
        stack = EmbeddedStack(
            Path(home),
            config_template=CONFIG.format(otpm=args.otpm, learn="true" if learn else "false"),
            workers=4,
            worker_concurrency=max(1, args.concurrency // 4),
            simulator_args=("--config-json", sim.model_dump_json()),
        )
        try:
            stack.start()
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=300
            ) as http:
                started = time.monotonic()
                body = {"requests": lines, "priority": args.priority}
                batch = http.post("/v1/batches", json=body).raise_for_status().json()["id"]
                wait_batch(http, batch, timeout_s=args.timeout, poll_s=0.5)
                wall = time.monotonic() - started
                results = [json.loads(x) for x in http.get(f"/v1/batches/{batch}/results").iter_lines()]
            stats = httpx.get(
                f"{stack.simulator_url}/_sim/stats", params={"records": 20000}, timeout=60
            ).json()
        finally:
            stack.stop()
        if args.timeline:  # the simulator's call records, and the stack's logs
            target = Path(args.timeline) / f"short-answers-{'on' if learn else 'off'}-{args.otpm_counts}"
            target.mkdir(parents=True, exist_ok=True)
            (target / "records.json").write_text(json.dumps(stats["records"]))
            for log in (Path(home) / "logs").glob("*.log"):
                (target / log.name).write_bytes(log.read_bytes())
    succeeded = sum(r["status"] == "succeeded" for r in results)
    outputs = [
        r["response"]["body"]["usage"]["completion_tokens"] for r in results if r["status"] == "succeeded"
    ]
    span = admission_span(stats["records"])
    return {
        "succeeded": succeeded,
        "lost": len(lines) - succeeded,
        "calls": stats["received"].get("anthropic", 0),
        "429s": stats["answered"].get("anthropic", {}).get("429", 0),
        "span": span,
        "wall": wall,
        "mean_output": sum(outputs) / max(1, len(outputs)),
    }


def main(args: argparse.Namespace, vocabulary: list[str]) -> None:
    lines = workload(args.requests, args.seed, vocabulary, args.long_share)
    longs = sum("[[sim:" in line["body"]["messages"][0]["content"] for line in lines)
    print(
        f"{args.requests} requests, max_tokens {MAX_TOKENS:,}, answers of 200 to 400 tokens "
        f"({longs} of {MAX_TOKENS:,}), "
        f"OTPM {args.otpm:,} (the simulator counts {args.otpm_counts} at admission), "
        f"latency {args.latency_ms:.0f} +/- {args.latency_ms / 2:.0f} ms, concurrency {args.concurrency}, "
        f"priority {args.priority}",
        flush=True,
    )
    print("| run | req/min (span) | req/min (wall) | span | wall | 429s | calls | lost | mean output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.runs.split(","):
        if name not in ("learned-off", "learned-on"):
            raise SystemExit(f"--workload short-answers runs learned-off and learned-on, not {name!r}")
        r = run(args, lines, learn=name == "learned-on")
        refused = r["429s"] / max(1, r["calls"])
        per_span, per_wall = r["succeeded"] / max(r["span"], 1e-9) * 60, r["succeeded"] / r["wall"] * 60
        print(
            f"| {name} | {per_span:.0f} | {per_wall:.0f} "
            f"| {r['span']:.1f} s | {r['wall']:.1f} s | {r['429s']} ({refused:.2%}) | {r['calls']} "
            f"| {r['lost']} | {r['mean_output']:.0f} |",
            flush=True,
        )
