"""How close to the ideal the pool runs on each limiter shape, and how many 429s it takes to get there.

One seeded workload (prompts of 10 to 300 words, max_tokens drawn from --max-tokens) against the
simulator's OpenAI dialect, limited to --rpm / --tpm by each limiter shape in turn (--shapes:
``token-bucket``, ``rolling``, ``fixed``, and a shape with a sub-window enforced with the minute
written ``fixed/10``). Every answer fills its max_tokens, so a call uses exactly what it reserved
and the ideal below is exact. Runs per shape (--runs):

  headrace     Headrace, 4 worker processes x (concurrency / 4) threads
  naive        asyncio + the official SDK (its own retries: 2, honouring retry-after), concurrency at once
  headrace-1   Headrace, 1 worker process x concurrency threads
  headrace-2x  Headrace, 4 processes, deployments file claiming twice the real TPM
A Headrace run may name the batch's priority, e.g. ``headrace@bulk`` (default: --priority).

With --faults each shape also runs Headrace with 5% of calls failing HTTP 500 and a 10 s outage
(every call 503) starting --outage-at seconds after the first admission, beside the same run
without faults.

Measures, from the simulator's own records:
  span   first to last admission at the provider
  ideal  what a clairvoyant client holding exactly the limit would need: the calls admitted in
         order, each at the first moment the shape's own rules (headrace/simulator/buckets.py, on
         a virtual clock) let it in at the provider's price (1 request; prompt tokens by the
         simulator's count + max_tokens), no latency, no concurrency limit
         (headrace/simulator/ideal.py)
  429s   provider refusals, as a share of calls made; lost: requests that did not succeed

Targets: 429s <= 0.5% of calls, span within 10% of ideal, nothing lost; with faults, the span at
most 10 s (the outage) longer than without.

    python bench/rate_limits.py --requests 600 --rpm 900 --tpm 600000 --concurrency 32

``--workload short-answers`` runs another workload instead: max_tokens 4,096, answers of ~300
tokens, on an Anthropic deployment's OTPM, learned output reservations off and on
(``bench/short_answers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import short_answers
from bench.measure import cpu_seconds, wait_batch
from headrace.simulator.buckets import Rules
from headrace.simulator.config import SimConfig
from headrace.simulator.ideal import admission_span, ideal_span
from headrace.simulator.server import running_simulator
from headrace.simulator.tokens import count_prompt_tokens
from headrace.stack import EmbeddedStack
from workers.admission import estimate_prompt_tokens

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no will more about "
    "can out other headrace waterwheel millpond sluicegate 1848 2026 42 turbine throughput, latency; "
    "reliability: (backoff) idempotency-keyed rate-limited re-queued JSON_lines multi-provider"
)
VOCABULARY = _WORDS.split()

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


def workload(n: int, seed: int, max_tokens: list[int]) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choices(VOCABULARY, k=rng.randint(10, 300)))
        body = {
            "model": "bench",
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}],
            "max_tokens": rng.choice(max_tokens),
        }
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def provider_costs(lines: list[dict[str, Any]]) -> list[dict[str, int]]:
    """What the simulator charges each call at admission (OpenAI: prompt + max_tokens)."""
    return [
        {"requests": 1, "tokens": count_prompt_tokens(line["body"]["messages"]) + line["body"]["max_tokens"]}
        for line in lines
    ]


def parse_shape(spec: str) -> Rules:
    shape, _, sub = spec.partition("/")
    return Rules(shape, 60.0, float(sub) if sub else None)  # type: ignore[arg-type]


def sim_config(args: argparse.Namespace, rules: Rules, *, faults: bool = False) -> SimConfig:
    longest = max(args.max_tokens)
    return SimConfig(
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_ms / 2,
        rpm=args.rpm,
        tpm=args.tpm,
        limiter=rules.shape,
        window_s=rules.window_s,
        sub_window_s=rules.sub_window_s,
        # Every answer runs to its max_tokens: a call uses what it reserved, and the ideal is exact.
        min_output_tokens=longest,
        max_output_tokens=longest,
        seed=args.seed,
        fault_rate=0.05 if faults else 0.0,
        faults=["500"],
    )


def sim_args(config: SimConfig) -> tuple[str, ...]:
    return ("--config-json", config.model_dump_json())


class Outage(threading.Thread):
    """Every call fails 503 for ``length_s``, starting ``after_s`` after the first admission."""

    def __init__(self, url: str, after_s: float, length_s: float, restore: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.after_s, self.length_s, self.restore = url, after_s, length_s, restore
        self.window: tuple[float, float] | None = None

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as sim:
            while (
                not sim.get("/_sim/stats", params={"records": 0})
                .json()["admitted"]
                .get("openai", {})
                .get("requests")
            ):
                time.sleep(0.1)
            time.sleep(self.after_s)
            sim.post("/_sim/config", json={"fault_rate": 1.0, "faults": ["503"]}).raise_for_status()
            started = time.time()
            time.sleep(self.length_s)
            sim.post("/_sim/config", json=self.restore).raise_for_status()
            self.window = (started, time.time())


def write_timeline(
    out: Path, rules: Rules, faults: bool, stats: dict[str, Any], logs: Path, outage: Outage | None
) -> None:
    """Per second from the first call: calls by outcome, and admitted tokens; the simulator's call
    records (records.json) and the stack's logs beside."""
    name = f"{rules.shape}-{rules.sub_window_s or ''}{'-faults' if faults else ''}".replace(".0", "")
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    records = stats.get("records", [])
    if records:
        t0 = min(r["t"] for r in records)
        seconds: dict[int, dict[str, int]] = {}
        for r in records:
            second = seconds.setdefault(int(r["t"] - t0), {})
            key = f"{r['status']}"
            second[key] = second.get(key, 0) + 1
            if r["admitted"]:
                second["tokens"] = second.get("tokens", 0) + r["input_tokens"] + r["reserved_tokens"]
        lines = [f"{s:4d} {json.dumps(seconds[s], sort_keys=True)}" for s in sorted(seconds)]
        if outage is not None and outage.window:
            lines.insert(0, f"outage {outage.window[0] - t0:.1f} .. {outage.window[1] - t0:.1f} s")
        (target / "timeline.txt").write_text("\n".join(lines) + "\n")
        (target / "records.json").write_text(json.dumps(records))
    for log in logs.glob("*.log"):
        (target / log.name).write_bytes(log.read_bytes())


def summarize(stats: dict[str, Any], lost: int, wall: float, cpu: float) -> dict[str, Any]:
    return {
        "span": admission_span(stats["records"]),
        "429s": stats["answered"].get("openai", {}).get("429", 0),
        "calls": stats["received"].get("openai", 0),
        "lost": lost,
        "wall": wall,
        "cpu": cpu,
    }


def run_headrace(
    args: argparse.Namespace,
    lines: list[dict[str, Any]],
    rules: Rules,
    *,
    workers: int = 4,
    tpm_claimed: int | None = None,
    faults: bool = False,
    priority: str = "default",
) -> dict[str, Any]:
    config = sim_config(args, rules, faults=faults)
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as home:
        stack = EmbeddedStack(
            Path(home),
            config_template=CONFIG.format(rpm=args.rpm, tpm=tpm_claimed or args.tpm),
            workers=workers,
            worker_concurrency=max(1, args.concurrency // workers),
            simulator_args=sim_args(config),
        )
        try:
            stack.start()
            pids = [p.pid for p in stack.processes if p.name.startswith("worker")]
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            outage = None
            if faults:
                restore = {"fault_rate": config.fault_rate, "faults": config.faults}
                outage = Outage(stack.simulator_url, args.outage_at, 10.0, restore)
                outage.start()
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=300
            ) as http:
                started = time.monotonic()
                body = {"requests": lines, "priority": priority}
                batch = http.post("/v1/batches", json=body).raise_for_status().json()["id"]
                wait_batch(http, batch, timeout_s=args.timeout, poll_s=0.5)
                wall = time.monotonic() - started
                results = [json.loads(x) for x in http.get(f"/v1/batches/{batch}/results").iter_lines()]
            if outage is not None:
                outage.join(30)
            cpu = sum(cpu_seconds(pid) for pid in pids) - cpu_before
            stats = httpx.get(
                f"{stack.simulator_url}/_sim/stats", params={"records": 20000}, timeout=60
            ).json()
        finally:
            stack.stop()
        if args.timeline:
            write_timeline(Path(args.timeline), rules, faults, stats, Path(home) / "logs", outage)
    errors = []
    for line, result in zip(lines, results, strict=True):
        if result["status"] == "succeeded":
            true = result["response"]["body"]["usage"]["prompt_tokens"]
            errors.append((estimate_prompt_tokens(line["body"]) - true) / true)
    lost = sum(result["status"] != "succeeded" for result in results)
    return {**summarize(stats, lost, wall, cpu), "estimate_errors": errors}


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


def run_naive(args: argparse.Namespace, lines: list[dict[str, Any]], rules: Rules) -> dict[str, Any]:
    with running_simulator(sim_config(args, rules)) as url:
        cpu_before = time.process_time()
        started = time.monotonic()
        lost = asyncio.run(naive_client(url, lines, args.concurrency))
        wall = time.monotonic() - started
        cpu = time.process_time() - cpu_before
        stats = httpx.get(f"{url}/_sim/stats", params={"records": 20000}, timeout=60).json()
    return summarize(stats, lost, wall, cpu)


def row(shape: str, run: str, ideal: float, result: dict[str, Any], baseline: float | None) -> str:
    refused = result["429s"] / max(1, result["calls"])
    extra = "" if baseline is None else f" ({result['span'] - baseline:+.1f} s)"
    return (
        f"| {shape} | {run} | {ideal:.1f} s | {result['span']:.1f} s{extra} | {result['span'] / ideal:.2f} "
        f"| {result['429s']} ({refused:.2%}) | {result['calls']} | {result['lost']} "
        f"| {result['wall']:.1f} s | {result['cpu']:.1f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rpm", type=int, default=900)
    parser.add_argument("--tpm", type=int, default=600_000)
    parser.add_argument(
        "--max-tokens", type=lambda s: [int(x) for x in s.split(",")], default="256,512,1024,1536,2048"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency-ms", type=float, default=60.0)
    parser.add_argument("--priority", default="default", help="of the Headrace runs without @priority")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--shapes", default="token-bucket,rolling,fixed,fixed/10")
    parser.add_argument(
        "--runs", default=None, help="default: headrace,naive (short-answers: learned-off,learned-on)"
    )
    parser.add_argument("--workload", choices=("mixed", "short-answers"), default="mixed")
    parser.add_argument("--otpm", type=int, default=80_000, help="short-answers: the deployment's OTPM")
    parser.add_argument(
        "--otpm-counts", choices=("output", "max_tokens"), default="output", help="short-answers: see its doc"
    )
    parser.add_argument(
        "--long-share", type=float, default=0.0, help="short-answers: share of answers run to max_tokens"
    )
    parser.add_argument(
        "--faults", action="store_true", help="also run Headrace with 5%% 500s and a 10 s outage"
    )
    parser.add_argument("--outage-at", type=float, default=2.0, help="seconds after the first admission")
    parser.add_argument(
        "--timeline", default="", help="a directory: per run, calls per second by outcome, and the logs"
    )
    args = parser.parse_args()
    if args.workload == "short-answers":
        args.runs = args.runs or "learned-off,learned-on"
        short_answers.main(args, VOCABULARY)
        return
    args.runs = args.runs or "headrace,naive"
    lines = workload(args.requests, args.seed, args.max_tokens)
    costs = provider_costs(lines)
    print(
        f"{args.requests} requests ({sum(c['tokens'] for c in costs):,} tokens at the provider's price), "
        f"limit {args.rpm} RPM / {args.tpm:,} TPM, concurrency {args.concurrency}, priority {args.priority}, "
        f"simulated latency {args.latency_ms:.0f} ms",
        flush=True,
    )
    print("| shape | run | ideal span | span | span / ideal | 429s | calls | lost | wall | worker CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors: list[float] = []
    for spec in args.shapes.split(","):
        rules = parse_shape(spec)
        ideal = ideal_span(costs, {"requests": args.rpm, "tokens": args.tpm}, rules)
        clean: float | None = None
        for run in args.runs.split(","):
            name, _, priority = run.partition("@")
            priority = priority or args.priority
            if name == "naive":
                result = run_naive(args, lines, rules)
            else:
                workers = 1 if name == "headrace-1" else 4
                claimed = 2 * args.tpm if name == "headrace-2x" else None
                result = run_headrace(
                    args, lines, rules, workers=workers, tpm_claimed=claimed, priority=priority
                )
                run = f"{name}, {priority}"
            errors += result.get("estimate_errors", [])
            if name == "headrace" and priority == args.priority and clean is None:
                clean = result["span"]
            print(row(spec, run, ideal, result, None), flush=True)
        if args.faults:
            result = run_headrace(args, lines, rules, faults=True, priority=args.priority)
            print(
                row(spec, f"headrace, {args.priority}, 5% 500s + 10 s outage", ideal, result, clean),
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
