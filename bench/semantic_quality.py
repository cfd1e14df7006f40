"""How well the semantic cache tells a reworded question from a different one, and what a search costs.

Quality: every pair of ``tests/data/semantic_pairs.jsonl`` (questions labelled ``same``, reworded,
or ``different``, topically close but asking something else) is embedded with the default
embedder; for each threshold from 0.70 to 0.99 it prints the hit rate on ``same`` pairs (a reworded
question served from the cache) and the false-hit rate on ``different`` pairs (a wrong answer
served), then recommends the lowest threshold whose false-hit rate is at most ``--max-false``.

Latency: an index of 1k, 5k and 20k entries (random unit vectors, the embedder's width) in a
redis-server of its own, searched ``--queries`` times: ``SemanticIndex.nearest`` ending in a hit
(the read of every record, the scoring, the candidates' keys and answers checked: three round
trips) and in a miss (the read and the scoring), the read alone, ``add``, and the bytes the
index's keys hold.

    python bench/semantic_quality.py
    python bench/semantic_quality.py --skip-latency --openai-model text-embedding-3-small
    python bench/semantic_quality.py --sizes 1000,5000,20000 --queries 200 --redis-url redis://127.0.0.1:6379/15
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headrace.embedded import start_redis
from workers.embeddings import Embedder, OpenAIEmbedder, WordLlamaEmbedder
from workers.semantic_index import Scope, SemanticIndex, index_keys

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "semantic_pairs.jsonl"
THRESHOLDS = [round(0.70 + 0.01 * i, 2) for i in range(30)]


def load_pairs(path: Path = PAIRS) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pair_similarities(embedder: Embedder, pairs: list[dict[str, str]]) -> npt.NDArray[np.float32]:
    """The cosine similarity of each pair's two questions."""
    a = embedder.embed([p["a"] for p in pairs])
    b = embedder.embed([p["b"] for p in pairs])
    return np.einsum("ij,ij->i", a, b)


def rates(similarities: npt.NDArray[np.float32], labels: list[str], threshold: float) -> tuple[float, float]:
    """(hit rate on ``same`` pairs, false-hit rate on ``different`` pairs) at ``threshold``."""
    same = np.array([label == "same" for label in labels])
    hits = similarities >= threshold
    return float(hits[same].mean()), float(hits[~same].mean())


def quality(embedder: Embedder, max_false: float) -> None:
    pairs = load_pairs()
    labels = [p["label"] for p in pairs]
    sims = pair_similarities(embedder, pairs)
    n_same, n_diff = labels.count("same"), labels.count("different")
    print(f"embedder {embedder.name}: {n_same} 'same' pairs, {n_diff} 'different' pairs")
    near = np.array([p.get("kind") == "near-duplicate" for p in pairs])
    print(f"{'threshold':>9}  {'hit rate':>8}  {'paraphrase':>10}  {'near-dup':>8}  {'false hits':>10}")
    recommended: float | None = None
    for threshold in THRESHOLDS:
        hit, false = rates(sims, labels, threshold)
        hits = sims >= threshold
        paraphrase = float(hits[np.array(labels) == "same"][~near[np.array(labels) == "same"]].mean())
        print(
            f"{threshold:>9.2f}  {hit:>8.1%}  {paraphrase:>10.1%}  {float(hits[near].mean()):>8.1%}  "
            f"{false:>10.1%}"
        )
        if recommended is None and false <= max_false:
            recommended = threshold
    if recommended is None:
        # Pairs no threshold separates (a bag of tokens cannot see word order) set a floor.
        floor = rates(sims, labels, THRESHOLDS[-1])[1]
        recommended = next(t for t in THRESHOLDS if rates(sims, labels, t)[1] <= floor)
        hit, false = rates(sims, labels, recommended)
        print(
            f"no threshold up to 0.99 keeps false hits at or below {max_false:.0%}: {false:.1%} at each "
            f"from {recommended:.2f} up (the pairs scoring 1.000 below); recommended: {recommended:.2f}, "
            f"the lowest at that floor (hit rate {hit:.1%})"
        )
    else:
        hit, false = rates(sims, labels, recommended)
        print(f"recommended: {recommended:.2f} (hit rate {hit:.1%}, false hits {false:.1%})")
    print("most similar 'different' pairs (what a low threshold would serve wrongly):")
    different = [i for i, label in enumerate(labels) if label == "different"]
    for i in sorted(different, key=lambda i: -sims[i])[:8]:
        print(f"  {sims[i]:.3f}  {pairs[i]['a']!r} / {pairs[i]['b']!r}")
    print("least similar 'same' pairs (what a high threshold misses):")
    same = [i for i, label in enumerate(labels) if label == "same"]
    for i in sorted(same, key=lambda i: sims[i])[:5]:
        print(f"  {sims[i]:.3f}  {pairs[i]['a']!r} / {pairs[i]['b']!r}")
    started = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for p in pairs:
            embedder.embed([p["a"]])
    per_question_us = (time.perf_counter() - started) / (rounds * len(pairs)) * 1e6
    print(f"embedding one question: {per_question_us:.0f} us")


@contextlib.contextmanager
def redis_at(url: str | None) -> Iterator[redis.Redis]:
    if url:
        yield redis.Redis.from_url(url)
        return
    with tempfile.TemporaryDirectory() as tmp:
        proc, own_url = start_redis(Path(tmp), appendonly=False)
        try:
            yield redis.Redis.from_url(own_url)
        finally:
            proc.stop()


def latency(client: redis.Redis, sizes: list[int], dim: int, queries: int) -> None:
    rng = np.random.default_rng(0)
    print(
        f"{'entries':>8}  {'hit p50':>8}  {'p95':>7}  {'miss p50':>8}  {'load p50':>8}  "
        f"{'add p50':>7}  {'index bytes':>11}"
    )
    for size in sizes:
        index = SemanticIndex(client, max_entries=size)
        scope = Scope(f"bench:{size}", "params", f"random-{dim}")
        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with client.pipeline(transaction=False) as pipe:
            for i in range(size):
                pipe.set(f"bench:answer:{size}:{i}", b"x", ex=3600)
            pipe.execute()
        add_ms = []
        for i, vector in enumerate(vectors):
            started = time.perf_counter()
            index.add(scope, vector, f"bench:answer:{size}:{i}", ttl_s=3600)
            add_ms.append((time.perf_counter() - started) * 1000)
        hit_ms, miss_ms, load_ms = [], [], []
        for q in range(queries):
            # A near-duplicate of a stored vector: the search ends in a hit and checks its answer.
            noise = rng.standard_normal(dim).astype(np.float32)
            query = vectors[q % size] + 0.2 * noise / np.linalg.norm(noise)
            query /= np.linalg.norm(query)
            started = time.perf_counter()
            match = index.nearest(scope, query, min_similarity=0.9)
            hit_ms.append((time.perf_counter() - started) * 1000)
            assert match is not None and match.entry_key == f"bench:answer:{size}:{q % size}"
            # A fresh vector: nothing comes near it, so the search ends after its one read.
            started = time.perf_counter()
            assert index.nearest(scope, noise / np.linalg.norm(noise), min_similarity=0.9) is None
            miss_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            index._load(scope, dim)
            load_ms.append((time.perf_counter() - started) * 1000)
        memory = sum(client.memory_usage(key) or 0 for key in index_keys(scope))
        p95 = statistics.quantiles(hit_ms, n=20)[18]
        hit, miss, load, add = (statistics.median(ms) for ms in (hit_ms, miss_ms, load_ms, add_ms))
        print(
            f"{size:>8}  {hit:>6.2f}ms  {p95:>5.2f}ms  {miss:>6.2f}ms  {load:>6.2f}ms  {add:>5.2f}ms  "
            f"{memory:>11,}"
        )
        with client.pipeline(transaction=False) as pipe:
            for i in range(size):
                pipe.delete(f"bench:answer:{size}:{i}")
            pipe.delete(*index_keys(scope))
            pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-false", type=float, default=0.02, help="false-hit rate to stay within")
    parser.add_argument("--sizes", default="1000,5000,20000", help="index sizes to time, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="searches per size")
    parser.add_argument("--redis-url", help="a Redis to use (default: a redis-server of its own)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--openai-model", help="measure an OpenAI-compatible embeddings deployment instead")
    parser.add_argument("--openai-base-url", help="its base URL, e.g. http://127.0.0.1:9100/v1")
    parser.add_argument("--openai-key-env", default="OPENAI_API_KEY", help="the variable holding its key")
    parser.add_argument("--openai-dimensions", type=int, help="the dimensions to ask it for")
    args = parser.parse_args()
    embedder: Embedder = WordLlamaEmbedder()
    if args.openai_model:
        embedder = OpenAIEmbedder(
            model=args.openai_model,
            base_url=args.openai_base_url,
            api_key_env=args.openai_key_env,
            dimensions=args.openai_dimensions,
        )
    quality(embedder, args.max_false)
    if not args.skip_latency:
        sizes = [int(s) for s in args.sizes.split(",")]
        with redis_at(args.redis_url) as client:
            latency(client, sizes, embedder.dim, args.queries)


if __name__ == "__main__":
    main()
