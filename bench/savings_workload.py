"""The workload of bench/savings.py: unique questions, exact repeats, bursts of identical requests
and paraphrases (the labelled ``same`` pairs of ``tests/data/semantic_pairs.jsonl`` and a few more
below), seeded, with the answer the simulator gives each question to check what was served."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from headrace.simulator.answers import build_answer
from headrace.simulator.config import SimConfig

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
