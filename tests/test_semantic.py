"""The semantic cache's pieces on their own: the offline embedder, the embeddings endpoint through
the official SDK, the semantic key, the Redis vector index, and the threshold's measured quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import redis as redis_lib
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from headrace.simulator.embeddings import pseudo_embedding
from headrace.simulator.tokens import text_tokens
from workers import embeddings
from workers.embeddings import (
    DEFAULT_THRESHOLD,
    EmbeddingFailed,
    OpenAIEmbedder,
    WordLlamaEmbedder,
)
from workers.semantic_index import (
    Match,
    Scope,
    SemanticIndex,
    expiries_key,
    index_keys,
    quantized,
    record_dtype,
    slots_key,
    vectors_key,
)
from workers.semantic_key import semantic_key

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "tests" / "data" / "semantic_pairs.jsonl"
# Measured by bench/semantic_quality.py on tests/data/semantic_pairs.jsonl at DEFAULT_THRESHOLD.
MAX_FALSE_HIT_RATE = 0.03  # measured 2.5%: the two word-order swaps among 80 different pairs
MIN_HIT_RATE = 0.15  # measured 18.8% of 80 reworded pairs

OFFLINE_LOAD = textwrap.dedent(
    """
    import json, socket
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    real_connect = socket.socket.connect
    def loopback_only(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            refuse()
        return real_connect(sock, address)
    socket.socket.connect = loopback_only
    socket.getaddrinfo = refuse
    socket.create_connection = refuse
    from workers.embeddings import WordLlamaEmbedder
    rows = WordLlamaEmbedder().embed(["What is the capital of France?", "Which city is France's capital?"])
    import logging
    handlers = len(logging.getLogger().handlers)  # wordllama's import-time basicConfig, undone
    similarity = float(rows[0] @ rows[1])
    print(json.dumps({"shape": list(rows.shape), "similarity": similarity, "handlers": handlers}))
    """
)


def test_wordllama_loads_and_embeds_with_the_network_off_and_an_empty_home(tmp_path: Path) -> None:
    """The default embedder needs nothing but its wheel: no download, no cache under HOME."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "XDG_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="0", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [2, 256]
    assert result["similarity"] > 0.8
    assert result["handlers"] == 0
    assert list(home.iterdir()) == []  # nothing cached, nothing downloaded


def test_wordllama_rows_are_unit_float32_and_deterministic() -> None:
    """Each text gives one unit-length float32 row; the same text, the same row; no text, zeros."""
    embedder = WordLlamaEmbedder()
    rows = embedder.embed(["How do I reverse a list in Python?", "", "How do I reverse a list in Python?"])
    assert rows.dtype == np.float32 and rows.shape == (3, embedder.dim)
    assert np.allclose(np.linalg.norm(rows[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert np.array_equal(rows[0], rows[2])
    assert not np.isnan(rows).any()
    assert embedder.embed([]).shape == (0, embedder.dim)


def test_wordllama_loads_once_however_many_threads_ask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads racing for the model share one load."""
    loads: list[int] = []

    def slow_load() -> object:
        loads.append(1)
        time.sleep(0.05)
        return object()

    monkeypatch.setattr(WordLlamaEmbedder, "_model", None)
    monkeypatch.setattr(embeddings, "_load_wordllama", slow_load)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(WordLlamaEmbedder.model())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and len({id(model) for model in seen}) == 1


def test_openai_embedder_gets_the_simulators_vectors_through_the_sdk(sim, sim_url, monkeypatch) -> None:
    """OpenAIEmbedder calls /v1/embeddings with the official SDK and answers its vectors, unit length."""
    monkeypatch.setenv("EMBED_KEY", "sk-embed-test")
    embedder = OpenAIEmbedder(
        model="text-embedding-3-small", base_url=f"{sim_url}/v1", api_key_env="EMBED_KEY", dimensions=64
    )
    texts = ["What is the capital of France?", "capital of France"]
    rows = embedder.embed(texts)
    assert rows.shape == (2, 64) and embedder.dim == 64
    expected = pseudo_embedding(["what", "is", "the", "capital", "of", "france"], 64)
    assert np.allclose(rows[0], expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    assert embedder.name == "openai-text-embedding-3-small-64"


def test_openai_embedder_learns_its_width_and_fails_as_embedding_failed(sim, sim_url, monkeypatch) -> None:
    """Without dimensions the width comes from the first answer; a refusal raises EmbeddingFailed."""
    monkeypatch.setenv("EMBED_KEY", "sk-embed-test")
    embedder = OpenAIEmbedder(model="any", base_url=f"{sim_url}/v1", api_key_env="EMBED_KEY")
    assert embedder.dim == 256
    keyless = OpenAIEmbedder(model="any", base_url=f"{sim_url}/v1", api_key_env="NO_SUCH_KEY_VARIABLE")
    with pytest.raises(EmbeddingFailed, match=r"set \$NO_SUCH_KEY_VARIABLE"):
        keyless.embed(["hello"])
    refused = OpenAIEmbedder(model="any", base_url=f"{sim_url}/v1", api_key_env="EMBED_KEY", dimensions=10**6)
    with pytest.raises(EmbeddingFailed, match="BadRequestError"):
        refused.embed(["hello"])


def test_simulator_embeddings_answer_floats_and_count_prompt_tokens(sim, sim_url) -> None:
    """Asked for floats, the endpoint answers lists of floats and usage.prompt_tokens as it counts them."""
    client = openai.OpenAI(base_url=f"{sim_url}/v1", api_key="sk-test", max_retries=0)
    texts = ["one two three", "Reverse a list in Python, please."]
    reply = client.embeddings.create(model="m", input=texts, encoding_format="float", dimensions=8)
    assert [len(item.embedding) for item in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == sum(text_tokens(t) for t in texts)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="m", input=[""])


# --- the semantic key ---------------------------------------------------------------------------


def _chat(question: str, **params: object) -> dict[str, object]:
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
    return {"model": "fast", "messages": messages, "temperature": 0, **params}


def test_semantic_key_embeds_the_final_question_and_hashes_the_rest() -> None:
    """Reworded final questions share a params hash; any other difference gives another."""
    a = semantic_key(_chat("What is the capital of France?"))
    b = semantic_key(_chat("Which city is France's capital?", stream=True, user="someone"))
    assert a is not None and b is not None
    assert a.text == "What is the capital of France?"
    assert a.params_hash == b.params_hash  # who asked and how the answer travels do not count
    question = {"role": "user", "content": "What is the capital of France?"}
    others = [
        _chat("What is the capital of France?", temperature=0.5),
        _chat("What is the capital of France?", max_tokens=10),
        _chat("What is the capital of France?", response_format={"type": "json_object"}),
        _chat("What is the capital of France?", tools=[{"type": "function", "function": {"name": "f"}}]),
        {**_chat(""), "messages": [{"role": "system", "content": "Answer at length."}, question]},
        {
            **_chat(""),
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, question],
        },
    ]
    hashes = {semantic_key(body).params_hash for body in others}  # type: ignore[union-attr]
    assert len(hashes) == len(others) and a.params_hash not in hashes


def test_semantic_key_is_none_when_only_an_exact_match_may_serve() -> None:
    """No key for a final turn that is not the user's, that is not only text, empty, or too long."""
    image = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    assert semantic_key(_chat(image)) is None  # type: ignore[arg-type]
    assert semantic_key(_chat("   ")) is None
    assert semantic_key(_chat("word " * 1000)) is None
    answered = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert semantic_key({"messages": answered}) is None
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    key = semantic_key(_chat(parts))  # type: ignore[arg-type]
    assert key is not None and key.text == "first\nsecond"


# --- the index ----------------------------------------------------------------------------------

DIM = 16
SCOPE = Scope("tenant:acme:fast", "params-1", "test-embedder")


def _unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _answer(client: redis_lib.Redis, key: str, ttl_s: float = 60) -> str:
    client.set(key, b"answer", px=int(ttl_s * 1000))
    return key


def test_index_finds_the_nearest_live_entry_above_the_threshold(redis) -> None:
    """nearest answers the most similar entry and its similarity, or None below min_similarity."""
    index = SemanticIndex(redis)
    for i in range(5):
        assert index.add(SCOPE, _unit(i), _answer(redis, f"ans:{i}"), ttl_s=60)
    query = _unit(3) + 0.05 * _unit(99)
    match = index.nearest(SCOPE, query / np.linalg.norm(query), min_similarity=0.9)
    assert isinstance(match, Match) and match.entry_key == "ans:3" and match.similarity > 0.95
    assert index.nearest(SCOPE, _unit(42), min_similarity=0.95) is None
    assert index.size(SCOPE) == 5


def _entries(client: redis_lib.Redis) -> list[bytes]:
    return sorted(client.zrange(expiries_key(SCOPE), 0, -1))


def test_index_keeps_at_most_max_entries_evicting_the_oldest(redis) -> None:
    """Past its bound, the index drops the entries closest to expiry (the oldest, for one TTL) and
    reuses their slots: its records never outgrow the bound."""
    index = SemanticIndex(redis, max_entries=3)
    for i in range(5):
        index.add(SCOPE, _unit(i), _answer(redis, f"ans:{i}"), ttl_s=60 + i)
    assert index.size(SCOPE) == 3 and _entries(redis) == [b"ans:2", b"ans:3", b"ans:4"]
    assert redis.strlen(vectors_key(SCOPE)) == 3 * record_dtype(DIM).itemsize
    assert index.nearest(SCOPE, _unit(0), min_similarity=0.99) is None
    assert index.nearest(SCOPE, _unit(1), min_similarity=0.99) is None
    assert index.nearest(SCOPE, _unit(4), min_similarity=0.99) == ("ans:4", pytest.approx(1.0, abs=2e-3))


def test_adding_an_entry_again_replaces_its_vector_in_place(redis) -> None:
    """The same entry key added twice keeps one slot, with the newer vector."""
    index = SemanticIndex(redis, max_entries=3)
    index.add(SCOPE, _unit(1), _answer(redis, "ans:1"), ttl_s=60)
    index.add(SCOPE, _unit(2), "ans:1", ttl_s=60)
    assert index.size(SCOPE) == 1 and redis.strlen(vectors_key(SCOPE)) == record_dtype(DIM).itemsize
    assert index.nearest(SCOPE, _unit(1), min_similarity=0.9) is None
    assert index.nearest(SCOPE, _unit(2), min_similarity=0.99) is not None


def test_index_entries_expire_with_their_ttl_and_are_pruned(redis) -> None:
    """An expired entry is never found, the next add removes it, and an idle index vanishes."""
    index = SemanticIndex(redis)
    index.add(SCOPE, _unit(1), _answer(redis, "ans:1"), ttl_s=0.05)
    time.sleep(0.1)
    assert index.nearest(SCOPE, _unit(1)) is None
    index.add(SCOPE, _unit(2), _answer(redis, "ans:2"), ttl_s=0.3)
    assert _entries(redis) == [b"ans:2"] and redis.hget(slots_key(SCOPE), "k:ans:1") is None
    assert redis.strlen(vectors_key(SCOPE)) == record_dtype(DIM).itemsize  # the freed slot, reused
    for key in index_keys(SCOPE)[:3]:
        assert 0 < redis.pttl(key) <= 300
    time.sleep(0.35)
    assert not any(redis.exists(key) for key in index_keys(SCOPE))


def test_index_skips_and_forgets_entries_whose_answer_is_gone(redis) -> None:
    """An entry whose answer was evicted gives way to the next candidate and leaves the index."""
    index = SemanticIndex(redis)
    index.add(SCOPE, _unit(1), "ans:evicted", ttl_s=60)
    near = _unit(1) + 0.1 * _unit(7)
    index.add(SCOPE, near / np.linalg.norm(near), _answer(redis, "ans:kept"), ttl_s=60)
    match = index.nearest(SCOPE, _unit(1), min_similarity=0.8)
    assert match is not None and match.entry_key == "ans:kept"
    assert _entries(redis) == [b"ans:kept"] and redis.hget(slots_key(SCOPE), "k:ans:evicted") is None


def test_an_index_missing_one_of_its_keys_starts_afresh(redis) -> None:
    """A cache Redis may evict one key of an index: the next add clears the rest and goes on."""
    index = SemanticIndex(redis)
    for i in range(3):
        index.add(SCOPE, _unit(i), _answer(redis, f"ans:{i}"), ttl_s=60)
    redis.delete(slots_key(SCOPE))
    index.add(SCOPE, _unit(5), _answer(redis, "ans:5"), ttl_s=60)
    assert _entries(redis) == [b"ans:5"]
    assert index.nearest(SCOPE, _unit(5), min_similarity=0.99) is not None
    assert index.nearest(SCOPE, _unit(1), min_similarity=0.99) is None


def test_index_scopes_never_see_each_other(redis) -> None:
    """Another tenant, route, params hash or embedder never matches, even with the same vector."""
    index = SemanticIndex(redis)
    index.add(SCOPE, _unit(1), _answer(redis, "ans:acme"), ttl_s=60)
    others = [
        Scope("tenant:globex:fast", SCOPE.params_hash, SCOPE.embedder),
        Scope("tenant:acme:smart", SCOPE.params_hash, SCOPE.embedder),
        Scope(SCOPE.cache_scope, "params-2", SCOPE.embedder),
        Scope(SCOPE.cache_scope, SCOPE.params_hash, "another-embedder"),
    ]
    for other in others:
        assert index.nearest(other, _unit(1)) is None
    assert index.nearest(SCOPE, _unit(1)) is not None


def test_index_keys_share_one_hash_tag_and_redis_errors_read_as_misses() -> None:
    """An index's keys hash to one Cluster slot; an unreachable Redis is a miss, not an error."""
    assert len({key_slot(key.encode()) for key in index_keys(SCOPE)}) == 1
    assert all(key.startswith("hrc:sem:{") for key in index_keys(SCOPE))
    unreachable = redis_lib.Redis(port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    index = SemanticIndex(unreachable)
    assert index.add(SCOPE, _unit(1), "ans:1", ttl_s=60) is False
    assert index.nearest(SCOPE, _unit(1)) is None
    assert index.remove(SCOPE, "ans:1") == 0


# --- quality --------------------------------------------------------------------------------------


def test_default_threshold_keeps_false_hits_rare_on_the_labelled_pairs() -> None:
    """At the default threshold, few topically close but different questions hit, and some
    reworded ones do (figures: bench/semantic_quality.py, README "Semantic cache")."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    assert len(pairs) >= 120
    embedder = WordLlamaEmbedder()
    a = embedder.embed([p["a"] for p in pairs])
    b = embedder.embed([p["b"] for p in pairs])
    similarities = np.einsum("ij,ij->i", a, b)
    hits = similarities >= DEFAULT_THRESHOLD
    same = np.array([p["label"] == "same" for p in pairs])
    assert hits[~same].mean() <= MAX_FALSE_HIT_RATE
    assert hits[same].mean() >= MIN_HIT_RATE
    # As the index stores them (int8 and a scale), the similarities barely move.
    blob = b"".join(bytes(8) + quantized(row) for row in a)  # bytes(8): the expiry's place
    records = np.frombuffer(blob, dtype=record_dtype(a.shape[1]))
    stored = np.einsum("ij,ij->i", records["vector"].astype(np.float32), b) * records["scale"]
    assert np.abs(stored - similarities).max() <= 2e-3
    assert np.array_equal(stored >= DEFAULT_THRESHOLD, hits)


def test_a_reworded_question_finds_the_cached_entry_end_to_end(redis) -> None:
    """Key, embedder and index together: a rewording hits, another question of the topic does not."""
    embedder, index = WordLlamaEmbedder(), SemanticIndex(redis)
    stored = semantic_key(_chat("How do I remove duplicates from a list in Python?"))
    assert stored is not None
    scope = Scope("tenant:acme:fast", stored.params_hash, embedder.name)
    index.add(scope, embedder.embed([stored.text])[0], _answer(redis, "ans:dedupe"), ttl_s=60)

    def lookup(question: str) -> Match | None:
        key = semantic_key(_chat(question))
        assert key is not None and key.params_hash == stored.params_hash
        return index.nearest(scope, embedder.embed([key.text])[0], min_similarity=DEFAULT_THRESHOLD)

    assert lookup("How do I remove duplicates from a Python list?") is not None
    assert lookup("How do I count duplicates in a list in Python?") is None
