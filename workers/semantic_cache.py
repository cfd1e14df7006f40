"""The semantic cache: an answer found by what the request means, on top of the exact key.

A route with ``cache = "semantic"`` looks its exact key up first (``workers/answer_cache.py``);
on a miss, its request's final question is embedded (``workers/embeddings.py``) and searched for
among the questions answered before in the same scope: same tenant namespace and route, same
conversation so far and same non-message parameters (``workers/semantic_key.py``), same embedder.
The closest one at or above the route's ``similarity_threshold`` (else
``HEADRACE_SEMANTIC_THRESHOLD``) gives its answer. Every answer this run stores is indexed the
same way (``workers/semantic_index.py``).

The embedder is ``wordllama``'s, offline in-process (its weights ship in its wheel), or the
deployment ``HEADRACE_EMBEDDINGS_DEPLOYMENT`` names (an OpenAI-compatible ``/v1/embeddings``). It
is built on first use: a pool whose routes never ask loads no model. Any failure is a miss.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from broker_config.deployments import DeploymentsConfig
from broker_config.settings import Settings
from workers.answer_cache import AnswerCache, CachedAnswer, CachePlan
from workers.embeddings import Embedder, OpenAIEmbedder, WordLlamaEmbedder
from workers.semantic_index import Scope, SemanticIndex
from workers.semantic_key import semantic_key

log = logging.getLogger(__name__)


class SemanticCache:
    def __init__(
        self,
        answers: AnswerCache,
        settings: Settings,
        config: DeploymentsConfig,
        embedder: Embedder | None = None,
    ) -> None:
        self.answers = answers
        self.index = SemanticIndex(answers.redis, max_entries=settings.semantic_max_entries)
        self.threshold = settings.semantic_threshold
        self._embedder = embedder
        self._embeddings_deployment = settings.embeddings_deployment
        self._config = config
        self._lock = threading.Lock()

    def embedder(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                name = self._embeddings_deployment
                self._embedder = (
                    OpenAIEmbedder.for_deployment(self._config.deployment(name))
                    if name
                    else WordLlamaEmbedder()
                )
            return self._embedder

    def nearest(self, plan: CachePlan, body: Mapping[str, Any]) -> tuple[CachedAnswer, float] | None:
        """The answer of the closest question within the threshold, and its similarity; or None."""
        found = self._scope_and_vector(plan, body)
        if found is None:
            return None
        scope, vector = found
        threshold = plan.similarity_threshold or self.threshold
        match = self.index.nearest(scope, vector, min_similarity=threshold)
        if match is None:
            return None
        answer = self.answers.get(match.entry_key)
        if answer is None:  # evicted since the index read it: not a hit, and not an entry any more
            self.index.remove(scope, match.entry_key)
            return None
        return answer, match.similarity

    def add(self, plan: CachePlan, body: Mapping[str, Any], answer_key: str) -> None:
        """Index the answer just stored under ``answer_key`` by its request's question."""
        found = self._scope_and_vector(plan, body)
        if found is not None:
            scope, vector = found
            self.index.add(scope, vector, answer_key, plan.ttl_s)

    def _scope_and_vector(self, plan: CachePlan, body: Mapping[str, Any]) -> tuple[Scope, Any] | None:
        key = semantic_key(body)
        if key is None:
            return None
        try:
            embedder = self.embedder()
            vector = embedder.embed([key.text])[0]
        except Exception as exc:  # EmbeddingFailed, a missing deployment, a model that fails to load
            log.warning("question not embedded (%s): the exact cache only", exc)
            return None
        return Scope(plan.scope, key.params_hash, embedder.name), vector
