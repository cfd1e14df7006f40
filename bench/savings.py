"""What the answer cache saves: one seeded workload, run with each cache feature off and on.

The workload (``--requests``, seeded): about half unique questions, 30% exact repeats of earlier
ones and 20% paraphrases of earlier ones (the labelled ``same`` pairs of
``tests/data/semantic_pairs.jsonl``, and a few more below), all at temperature 0, with bursts of
``--burst-size`` identical requests side by side in one batch. Besides the paraphrased
originals, the unique questions include the ``different`` pairs' near misses ("What is the capital
of Germany?" after "What is the capital of France?"): a semantic hit on one of those serves a
wrong answer. It is submitted as ``--batches`` batches, each once the one before has ended, so a
repeat or paraphrase comes after its original was answered; the first holds the originals.

Each configuration (``--configs``) runs it on a fresh ``EmbeddedStack`` (``--workers`` worker
processes x ``--concurrency`` threads) with one priced OpenAI-dialect deployment on the
simulator (``--latency-ms`` +/- a third, no faults, so a burst's calls overlap in flight):

  off        cache = "off"
  exact      cache = "exact", coalesce = false
  coalesce   cache = "exact", coalesce = true (single flight)
  semantic   cache = "semantic", coalesce = true

Reported per configuration: requests, provider calls (the simulator's ``received``), calls saved
against ``off``, cost (the batches' ``cost_usd``) and what the served requests saved (their result
lines' ``saved_cost_usd``), hits by kind (``cached`` with and without ``similarity``,
``coalesced``), requests not succeeded, wall time from the first submission to the last batch's
end (with the host's load average: the machine may be shared), how each kind of line was answered,
and wrong answers: every answer is checked against the simulator's own answer to the question
(``headrace/simulator/answers.py``; answers depend on the prompt), and a semantic hit is right
only when it serves its labelled pair's original. A fresh call whose answer the check would not
have predicted is counted too (``unpredicted_fresh``, must be 0: the check itself is wrong).

    python bench/savings.py --requests 400 --seed 1 --workers 4 --configs off,exact,coalesce,semantic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import wait_batch
from bench.savings_workload import (
    MODEL,
    ROUTE,
    Line,
    expected_answer,
    workload,
)
from headrace.simulator.config import SimConfig
from headrace.stack import EmbeddedStack

CONFIG = """
[[deployments]]
name = "priced"
provider = "openai"
model = "{model}"
base_url = "{{sim}}/v1"
api_key_env = "{{key_env}}"
rpm = 5000
tpm = 2000000
input_price_per_mtok = 2.50
output_price_per_mtok = 10.00

[[routes]]
name = "{route}"
deployments = ["priced"]
cache = "{cache}"
coalesce = {coalesce}
{threshold}
"""

# name -> (the route's cache, its coalesce)
CONFIGS: dict[str, tuple[str, bool]] = {
    "off": ("off", True),
    "exact": ("exact", False),
    "coalesce": ("exact", True),
    "semantic": ("semantic", True),
}


@dataclass
class Run:
    config: str
    lines: list[Line]
    results: list[dict[str, Any]]
    calls: int
    cost_usd: Decimal
    wall_s: float
    batch_walls_s: list[float] = field(default_factory=list)
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at its start and its end


def run_config(name: str, batches: list[list[Line]], args: argparse.Namespace) -> Run:
    kind, coalesce = CONFIGS[name]
    threshold = "" if args.threshold is None else f"similarity_threshold = {args.threshold}"
    config = CONFIG.format(
        model=MODEL, route=ROUTE, cache=kind, coalesce=str(coalesce).lower(), threshold=threshold
    )
    sim = SimConfig(
        latency_ms=args.latency_ms, latency_jitter_ms=args.latency_ms / 3, seed=args.seed, fault_rate=0.0
    )
    lines: list[Line] = []
    results: list[dict[str, Any]] = []
    cost = Decimal(0)
    walls: list[float] = []
    with tempfile.TemporaryDirectory(prefix="headrace-savings-") as home:
        stack = EmbeddedStack(
            Path(home),
            config_template=config,
            workers=args.workers,
            worker_concurrency=args.concurrency,
            simulator_args=("--config-json", sim.model_dump_json()),
        )
        try:
            stack.start()
            load_start = os.getloadavg()[0]
            headers = {"Authorization": f"Bearer {stack.api_key}"}
            with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as http:
                started = time.monotonic()
                for batch in batches:
                    submitted = time.monotonic()
                    body = {"requests": [line.request() for line in batch]}
                    batch_id = http.post("/v1/batches", json=body).raise_for_status().json()["id"]
                    view = wait_batch(http, batch_id, timeout_s=args.timeout, poll_s=0.1)
                    walls.append(time.monotonic() - submitted)
                    cost += Decimal(view["cost_usd"])
                    got = [
                        json.loads(x) for x in http.get(f"/v1/batches/{batch_id}/results").iter_lines() if x
                    ]
                    by_id = {r["custom_id"]: r for r in got}
                    lines += batch
                    results += [by_id.get(line.custom_id, {"status": "missing"}) for line in batch]
                wall = time.monotonic() - started
            stats = httpx.get(f"{stack.simulator_url}/_sim/stats", params={"records": 0}, timeout=30).json()
        finally:
            stack.stop()
    calls = sum(int(v) for v in stats["received"].values())
    return Run(name, lines, results, calls, cost, wall, walls, (load_start, os.getloadavg()[0]))


def served_as(result: dict[str, Any]) -> str:
    if result.get("coalesced"):
        return "coalesced"
    if result.get("cached"):
        return "semantic" if "similarity" in result else "exact"
    return "call"


def answer_text(result: dict[str, Any]) -> str | None:
    try:
        return str(result["response"]["body"]["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        return None


def summarize(run: Run, seed: int, off_calls: int | None) -> dict[str, Any]:
    """One configuration's row; ``wrong`` lists every answer served that is not its question's."""
    by_answer = {expected_answer(line.question, seed): line.question for line in run.lines}
    hits: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    saved = Decimal(0)
    not_succeeded: Counter[str] = Counter()
    wrong: list[dict[str, Any]] = []
    unpredicted = 0
    paraphrase_hits = 0
    similarities: list[float] = []
    for line, result in zip(run.lines, run.results, strict=True):
        if result.get("status") != "succeeded":
            not_succeeded[str(result.get("status"))] += 1
            continue
        how = served_as(result)
        hits[how] += 1
        by_kind.setdefault(line.kind, Counter())[how] += 1
        saved += Decimal(result.get("saved_cost_usd") or 0)
        text = answer_text(result)
        own = expected_answer(line.question, seed)
        if how == "call":
            unpredicted += text != own
            continue
        if how == "semantic":
            similarities.append(float(result["similarity"]))
        right = text == own or (
            how == "semantic" and line.kind == "paraphrase" and text == expected_answer(line.original, seed)
        )
        paraphrase_hits += right and how == "semantic" and line.kind == "paraphrase"
        if not right:
            wrong.append(
                {
                    "custom_id": line.custom_id,
                    "question": line.question,
                    "served": how,
                    "similarity": result.get("similarity"),
                    "answer_of": by_answer.get(text or "", "(no question of this workload)"),
                }
            )
    return {
        "config": run.config,
        "requests": len(run.lines),
        "provider_calls": run.calls,
        "calls_saved_vs_off": None if off_calls is None else off_calls - run.calls,
        "cost_usd": str(run.cost_usd),
        "saved_cost_usd": str(saved),
        "hits": {"exact": hits["exact"], "semantic": hits["semantic"], "coalesced": hits["coalesced"]},
        "served_by_kind": {kind: dict(c) for kind, c in sorted(by_kind.items())},
        "paraphrases_served_right": paraphrase_hits,
        "min_similarity": min(similarities) if similarities else None,
        "not_succeeded": sum(not_succeeded.values()),
        "not_succeeded_by_status": dict(not_succeeded),
        "wrong_answers": len(wrong),
        "wrong": wrong,
        "unpredicted_fresh": unpredicted,
        "wall_s": round(run.wall_s, 2),
        "load_avg_1m": [round(x, 2) for x in run.load_avg],
        "batch_walls_s": [round(w, 2) for w in run.batch_walls_s],
    }


def kinds_table(rows: list[dict[str, Any]]) -> str:
    """How each kind of line was answered: calls / exact hits / semantic hits / coalesced."""
    kinds = ("unique", "repeat", "burst", "paraphrase")
    out = ["| config | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for r in rows:
        cells = []
        for kind in kinds:
            got = r["served_by_kind"].get(kind, {})
            cells.append(
                " / ".join(str(got.get(how, 0)) for how in ("call", "exact", "semantic", "coalesced"))
            )
        out.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n(each cell: calls / exact hits / semantic hits / coalesced)"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| config | requests | provider calls | saved vs off | cost | saved_cost_usd | exact hits "
        "| semantic hits | coalesced | wrong answers | not succeeded | wall |"
    )
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        saved_calls = "-" if r["calls_saved_vs_off"] is None else str(r["calls_saved_vs_off"])
        out.append(
            f"| {r['config']} | {r['requests']} | {r['provider_calls']} | {saved_calls} "
            f"| ${Decimal(r['cost_usd']):.4f} | ${Decimal(r['saved_cost_usd']):.4f} | {r['hits']['exact']} "
            f"| {r['hits']['semantic']} ({r['paraphrases_served_right']} right) | {r['hits']['coalesced']} "
            f"| {r['wrong_answers']} | {r['not_succeeded']} | {r['wall_s']:.1f} s |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="threads per worker process")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-size", type=int, default=20)
    parser.add_argument("--latency-ms", type=float, default=450.0, help="simulated call latency, +/- a third")
    parser.add_argument("--threshold", type=float, default=None, help="the route's similarity_threshold")
    parser.add_argument("--timeout", type=float, default=300.0, help="per batch, s")
    args = parser.parse_args()
    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}: choose from {', '.join(CONFIGS)}")

    bench_started = time.monotonic()
    batches = workload(
        args.requests, args.seed, batches=args.batches, bursts=args.bursts, burst_size=args.burst_size
    )
    kinds = Counter(line.kind for batch in batches for line in batch)
    print(
        f"{sum(kinds.values())} requests in {len(batches)} batches of {[len(b) for b in batches]}: "
        f"{kinds['unique']} unique, {kinds['repeat']} repeats, {kinds['burst']} burst copies "
        f"({args.bursts} bursts of {args.burst_size}), {kinds['paraphrase']} paraphrases; "
        f"{args.workers} workers x {args.concurrency} threads, calls {args.latency_ms:.0f} ms "
        f"+/- {args.latency_ms / 3:.0f}, seed {args.seed}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    off_calls: int | None = None
    for name in names:
        run = run_config(name, batches, args)
        if name == "off":
            off_calls = run.calls
        row = summarize(run, args.seed, off_calls)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(table(rows))
    print()
    print(kinds_table(rows))
    for row in rows:
        for miss in row["wrong"]:
            print(f"wrong answer ({row['config']}): {json.dumps(miss)}")
        if row["unpredicted_fresh"]:
            print(f"{row['config']}: {row['unpredicted_fresh']} fresh answers the check did not predict")
    print(f"\nwhole bench: {time.monotonic() - bench_started:.1f} s")


if __name__ == "__main__":
    main()
