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
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import wait_batch
from headrace.simulator.answers import build_answer
from headrace.simulator.config import SimConfig
from headrace.stack import EmbeddedStack

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "semantic_pairs.jsonl"
REPEAT_SHARE = 0.3
PARAPHRASE_SHARE = 0.2
MODEL = "gpt-4o"
MAX_TOKENS = 100  # above the simulator's longest answer: no answer is cut
SYSTEM = "Answer briefly."
ROUTE = "answers"

# Reworded questions on topics the pairs file leaves out: 20% paraphrases of 400 requests is 80.
EXTRA_PAIRS: tuple[tuple[str, str], ...] = (
    ("How do volcanoes form?", "What causes a volcano to form?"),
    ("Where did the Olympic Games originate?", "What is the origin of the Olympic Games?"),
    ("How do I unclog a kitchen sink?", "What's the best way to clear a clogged kitchen sink?"),
    ("What does a mitochondrion do?", "What is the function of the mitochondria?"),
    ("How do I remove a red wine stain from carpet?", "How can I get red wine out of a carpet?"),
    ("How do I get rid of fruit flies?", "What's the best way to get rid of fruit flies in my kitchen?"),
    ("How do bees make honey?", "What is the process bees use to produce honey?"),
    ("Who composed The Four Seasons?", "Which composer wrote The Four Seasons?"),
    ("How do I descale a kettle?", "What's the way to remove limescale from a kettle?"),
    ("What is the theory of plate tectonics?", "Can you explain plate tectonics?"),
    ("How do tides work?", "What causes ocean tides?"),
    ("How do I whiten my teeth at home?", "What are home remedies for whitening teeth?"),
    (
        "What is the Great Wall of China made of?",
        "What materials were used to build the Great Wall of China?",
    ),
    ("How do I fold a fitted sheet?", "What's the trick to folding a fitted sheet?"),
    ("Why do cats purr?", "What makes cats purr?"),
    ("How is a credit score calculated?", "How does a credit score get worked out?"),
    ("How do I polish leather shoes?", "What's the right way to shine leather shoes?"),
    ("How do I jump-start a car battery?", "What are the steps to jump-start a dead car battery?"),
    ("Who invented the telephone?", "Which inventor created the telephone?"),
    ("How do I calm my nerves before a job interview?", "How can I manage anxiety before an interview?"),
    ("What is quantum entanglement?", "Can you explain quantum entanglement simply?"),
    ("How many bones are in the adult human body?", "How many bones does an adult human have?"),
    ("How do I grow tomatoes on a balcony?", "Can I grow tomatoes in pots on my balcony?"),
    ("What is the rule of thirds in photography?", "Explain the rule of thirds for taking photos."),
)

# Questions asked once (or repeated exactly), each on a topic of its own.
EXTRA_QUESTIONS: tuple[str, ...] = (
    "What is the history of the bicycle?",
    "How do submarines dive and surface?",
    "What language is spoken in Brazil?",
    "How do I patch a hole in drywall?",
    "What are the rules for castling in chess?",
    "Why do leaves change color in the fall?",
    "How does a refrigerator keep food cold?",
    "Recommend a board game for four players.",
    "What is the difference between weather and climate?",
    "How do I knit a scarf as a beginner?",
    "Who built the pyramids of Giza?",
    "How does compound interest work?",
    "What should I pack for a week of camping?",
    "Why is the ocean salty?",
    "How do I train a puppy to sit?",
    "What instruments are in a string quartet?",
    "How do vaccines train the immune system?",
    "What is the national animal of Scotland?",
    "How do I make a sourdough starter?",
    "How do noise-cancelling headphones work?",
    "What is the function of the liver?",
    "How do I write a cover letter?",
    "Why do we have leap years?",
    "Who was Cleopatra?",
    "How do solar panels generate electricity?",
    "What is a good stretching routine for runners?",
    "How do I remove rust from a bike chain?",
    "How do air traffic controllers keep planes apart?",
    "What is the Fibonacci sequence?",
    "How do I start composting at home?",
    "Why do onions make you cry?",
    "What were the main causes of the French Revolution?",
    "How does GPS determine your location?",
    "What is the best way to clean a cast iron pan?",
    "How do hurricanes get their names?",
    "What is an index fund?",
    "How do I set up two-factor authentication?",
    "Why do stars twinkle?",
    "How is paper made from trees?",
    "What is the offside rule in ice hockey?",
    "How do I repot an orchid?",
    "Who was Ada Lovelace?",
    "What is the Doppler effect?",
    "How do I negotiate a higher salary?",
)

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


@dataclass(frozen=True)
class Line:
    custom_id: str
    question: str
    kind: str  # unique, repeat, burst (a burst's copies; its first is unique), paraphrase
    original: str  # whose answer it may be served: its own question, or a paraphrase's original

    def request(self) -> dict[str, Any]:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]
        body = {"model": ROUTE, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
        return {"custom_id": self.custom_id, "body": body}


@dataclass
class Pools:
    pairs: list[tuple[str, str]]  # (original, paraphrase)
    firsts: list[str]  # originals of near misses: asked in the first batch
    laters: list[str]  # near misses and other questions: asked after it


def load_pools(path: Path = PAIRS) -> Pools:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    known = {q for r in rows for q in (r["a"], r["b"])}
    # The file grows: an extra already in it would be asked twice.
    extras = [pair for pair in EXTRA_PAIRS if not known & set(pair)]
    by_original = {a: (a, b) for a, b in [(r["a"], r["b"]) for r in rows if r["label"] == "same"] + extras}
    pairs = list(by_original.values())  # one paraphrase per original: each is asked once
    in_pairs = {q for r in rows if r["label"] == "same" for q in (r["a"], r["b"])} | {
        q for p in extras for q in p
    }
    different = [(r["a"], r["b"]) for r in rows if r["label"] == "different"]
    firsts = sorted({a for a, _ in different} - in_pairs)
    laters = sorted({b for _, b in different} - in_pairs - set(firsts))
    laters += [q for q in EXTRA_QUESTIONS if q not in known]
    return Pools(pairs, firsts, laters)


def workload(
    n: int, seed: int, *, batches: int, bursts: int, burst_size: int, pools: Pools | None = None
) -> list[list[Line]]:
    """The batches, in the order they are submitted."""
    if batches < 2:
        raise SystemExit("--batches must be at least 2: repeats and paraphrases follow their originals")
    rng = random.Random(seed)
    pools = pools or load_pools()
    n_para, n_repeat = round(n * PARAPHRASE_SHARE), round(n * REPEAT_SHARE)
    n_unique = n - n_para - n_repeat
    copies = bursts * (burst_size - 1)
    if copies > n_repeat:
        raise SystemExit(
            f"{bursts} bursts of {burst_size} need {copies} repeats; {n} requests have {n_repeat}"
        )
    pairs = rng.sample(pools.pairs, len(pools.pairs))
    if n_para > len(pairs):
        raise SystemExit(f"{n_para} paraphrases asked for, {len(pairs)} pairs known: fewer --requests")
    paraphrased, spare = pairs[:n_para], pairs[n_para:]
    laters = rng.sample(pools.laters, len(pools.laters))
    leads, laters = laters[:bursts], laters[bursts:]
    firsts = [a for a, _ in spare] + pools.firsts
    pool = [(q, True) for q in firsts] + [(q, False) for q in laters]
    wanted = n_unique - n_para - bursts
    if wanted < 0 or wanted > len(pool):
        raise SystemExit(f"{n_unique} unique questions asked for, {n_para + bursts + len(pool)} known")
    chosen = rng.sample(pool, wanted)

    plan: list[list[tuple[str, str, str]]] = [[] for _ in range(batches)]  # (question, kind, original)
    plan[0] += [(a, "unique", a) for a, _ in paraphrased] + [(q, "unique", q) for q, first in chosen if first]
    for i, q in enumerate(q for q, first in chosen if not first):
        plan[1 + i % (batches - 1)].append((q, "unique", q))
    for i, (a, b) in enumerate(paraphrased):
        plan[1 + i % (batches - 1)].append((b, "paraphrase", a))
    blocks: list[list[list[tuple[str, str, str]]]] = [[] for _ in range(batches)]
    for i, q in enumerate(leads):
        blocks[1 + i % (batches - 1)].append([(q, "unique", q)] + [(q, "burst", q)] * (burst_size - 1))
    for i in range(n_repeat - copies):
        k = 1 + i % (batches - 1)
        asked = [q for earlier in plan[:k] for q, kind, _ in earlier if kind == "unique"]
        asked += [block[0][0] for earlier in blocks[:k] for block in earlier]
        q = rng.choice(asked)
        plan[k].append((q, "repeat", q))

    out: list[list[Line]] = []
    for k, (items, burst_blocks) in enumerate(zip(plan, blocks, strict=True)):
        rng.shuffle(items)
        for block in burst_blocks:  # side by side, somewhere in the batch
            at = rng.randint(0, len(items))
            items[at:at] = block
        out.append([Line(f"b{k}-{i:03d}-{kind}", q, kind, o) for i, (q, kind, o) in enumerate(items)])
    return out


@cache
def expected_answer(question: str, seed: int) -> str:
    """The simulator's answer to ``question`` as this bench asks it (headrace/simulator/answers.py)."""
    sim = SimConfig(seed=seed)
    messages = Line("", question, "unique", question).request()["body"]["messages"]
    return build_answer(
        seed=seed,
        model=MODEL,
        prompt=messages,
        min_tokens=sim.min_output_tokens,
        max_tokens=sim.max_output_tokens,
        forced_tokens=None,
        cap_tokens=MAX_TOKENS,
        stops=(),
    ).text


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
