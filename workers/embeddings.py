"""Text to vectors for the semantic cache: a small Protocol and two implementations.

- ``WordLlamaEmbedder`` (the default) runs in-process and offline: the ``wordllama`` wheel carries
  its weights (``wordllama/weights/l2_supercat_256.safetensors``, 32,000 tokens x 256, fp16) and
  its tokenizer (``wordllama/tokenizers/l2_supercat_tokenizer_config.json``). An embedding is the
  mean of the text's token rows: static, about 0.1 ms a question on one core, no GPU, no download.
- ``OpenAIEmbedder`` calls an OpenAI-compatible ``/v1/embeddings`` through the official SDK, for a
  deployment that serves a real embedding model.

Every ``embed`` answers float32 rows of unit length, so a dot product is the cosine similarity.
Either may raise ``EmbeddingFailed``; the cache treats that as a miss, never as a failed request.

Why ``WordLlama.load`` is given the package's own folder as its cache: in wordllama 0.4.0.post1
the loader looks for a tokenizer in ``wordllama/tokenizer/`` (singular) while the wheel ships it
in ``wordllama/tokenizers/``; it then tries ``~/.cache/wordllama/tokenizers/`` and else downloads
from Hugging Face. With ``cache_dir`` = the package folder the second lookup finds the packaged
file, and ``disable_download=True`` turns any miss into an error rather than a network call.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import openai

from broker_config.deployments import Deployment
from broker_config.settings import SEMANTIC_THRESHOLD

Vectors = npt.NDArray[np.float32]

WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256  # the one size whose weights the wheel carries
DEFAULT_THRESHOLD = SEMANTIC_THRESHOLD  # calibrated for WordLlamaEmbedder only


class EmbeddingFailed(Exception):
    """The embedder could not answer (model missing, endpoint down or refusing)."""


class Embedder(Protocol):
    """Turns texts into unit-length float32 rows, one per text, ``dim`` wide.

    ``name`` identifies the model and size: vectors of two names never compare (the index keeps
    them apart)."""

    name: str

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> Vectors: ...


def normalized(rows: npt.ArrayLike) -> Vectors:
    """Rows scaled to unit length; an all-zero row (no known token) stays zero, never NaN."""
    matrix = np.asarray(rows, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix.reshape(1, -1)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit: Vectors = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return unit


class WordLlamaEmbedder:
    """The offline default: one model per process, loaded on first use by whichever thread asks."""

    name = f"wordllama-{WORDLLAMA_CONFIG}-{WORDLLAMA_DIM}"
    dim = WORDLLAMA_DIM

    _lock = threading.Lock()
    _model: Any = None  # wordllama.WordLlamaInference, shared by every instance

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # The model's tokens are cased ("What" and "what" are two rows) while a question's case
        # rarely changes its meaning: lower-cased, reworded questions hit more often and no
        # different one more (bench/semantic_quality.py).
        rows = self.model().embed([text.lower() for text in texts], norm=False)
        return normalized(rows)

    @classmethod
    def model(cls) -> Any:
        """The loaded ``WordLlamaInference`` (thread-safe, at most one load per process)."""
        if cls._model is None:
            with cls._lock:
                if cls._model is None:
                    cls._model = _load_wordllama()
        return cls._model


def _load_wordllama() -> Any:
    wordllama = _import_without_logging_setup("wordllama")
    package_dir = Path(wordllama.__file__).parent
    try:
        return wordllama.WordLlama.load(
            WORDLLAMA_CONFIG, dim=WORDLLAMA_DIM, cache_dir=package_dir, disable_download=True
        )
    except (FileNotFoundError, ValueError) as exc:
        raise EmbeddingFailed(f"wordllama weights or tokenizer missing from its wheel: {exc}") from exc


def _import_without_logging_setup(module: str) -> Any:
    """Import a module that calls ``logging.basicConfig`` at import time (wordllama does, twice),
    leaving the root logger as it was: the process's own logging setup decides (broker_config/logs)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(module)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


class OpenAIEmbedder:
    """An OpenAI-compatible ``/v1/embeddings`` deployment, called through the official SDK.

    ``dimensions``, when given, is sent (text-embedding-3-* shorten their vectors to it) and is
    ``dim``; otherwise ``dim`` is learned from the first answer (one probe call if asked first)."""

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout_s: float = 10.0,
        dimensions: int | None = None,
    ) -> None:
        self.model = model
        self.dimensions = dimensions
        self._dim = dimensions
        api_key = os.environ.get(api_key_env, "")
        self._client: openai.OpenAI | None = None
        self._no_client = f"no API key for the embeddings endpoint (set ${api_key_env})"
        if api_key:
            # SDK retries off, as for every provider call: a slow embedding is a miss, not a wait.
            self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self.name = f"openai-{model}-{dimensions}" if dimensions else f"openai-{model}"

    @classmethod
    def for_deployment(cls, deployment: Deployment, *, dimensions: int | None = None) -> OpenAIEmbedder:
        """The embedder of a configured deployment (provider ``openai`` or OpenAI-compatible)."""
        return cls(
            model=deployment.model,
            base_url=deployment.base_url,
            api_key_env=deployment.key_env,
            timeout_s=deployment.timeout_s or 10.0,
            dimensions=dimensions,
        )

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def embed(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        if self._client is None:
            raise EmbeddingFailed(self._no_client)
        extra: dict[str, Any] = {} if self.dimensions is None else {"dimensions": self.dimensions}
        try:
            reply = self._client.embeddings.create(model=self.model, input=list(texts), **extra)
        except openai.OpenAIError as exc:
            raise EmbeddingFailed(f"embeddings call failed: {type(exc).__name__}: {exc}") from exc
        rows = [item.embedding for item in sorted(reply.data, key=lambda item: item.index)]
        if len(rows) != len(texts):
            raise EmbeddingFailed(f"asked for {len(texts)} embeddings, got {len(rows)}")
        vectors = normalized(rows)
        if self._dim is None:
            self._dim = vectors.shape[1]
        elif vectors.shape[1] != self._dim:
            raise EmbeddingFailed(f"expected {self._dim} dimensions, got {vectors.shape[1]}")
        return vectors
