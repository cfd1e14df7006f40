"""OpenAI's ``POST /v1/embeddings``, simulated: deterministic pseudo-embeddings, offline.

A text's vector is a hashed bag of words: each lower-cased word adds +1 or -1 (by its hash) to one
of ``dimensions`` slots (by its hash), and the sum is scaled to unit length. Texts that share words
point the same way, so a semantic cache behaves plausibly against it, and the same text always
gives the same vector in any process (BLAKE2b, not Python's salted ``hash``).

The request: ``model`` (any name), ``input`` (a string, a list of strings, a list of token ids or
a list of such lists), optional ``dimensions`` (default 256) and ``encoding_format`` (``float``,
or ``base64``: little-endian float32, which the official SDK asks for by default). The answer:
``{"object": "list", "data": [{"object": "embedding", "index", "embedding"}], "model", "usage"}``,
``usage.prompt_tokens`` counted as ``headrace.simulator.tokens`` counts chat prompts.

An API key is checked as for chat calls; rate limits, latency and faults are not applied.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from headrace.simulator.dialect import SimError
from headrace.simulator.tokens import text_tokens

DEFAULT_DIMENSIONS = 256
MAX_DIMENSIONS = 4096
MAX_INPUTS = 2048  # OpenAI's own cap on inputs per request
_WORDS = re.compile(r"\w+")


def pseudo_embedding(words: list[str], dimensions: int) -> npt.NDArray[np.float32]:
    """The unit-length hashed bag of ``words`` (all zeros for no words)."""
    vector = np.zeros(dimensions, dtype=np.float32)
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        slot = int.from_bytes(digest[:4], "little") % dimensions
        vector[slot] += 1.0 if digest[4] & 1 else -1.0
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def embeddings_body(payload: Any) -> dict[str, Any]:
    """The answer to an embeddings request, or a ``SimError`` (400) naming the bad parameter."""
    if not isinstance(payload, dict):
        raise _invalid("We could not parse the JSON body of your request.", None)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter", "model")
    dimensions = payload.get("dimensions", DEFAULT_DIMENSIONS)
    if not _is_token(dimensions) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise _invalid(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", "dimensions")
    encoding = payload.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _invalid("encoding_format must be 'float' or 'base64'", "encoding_format")
    inputs = _inputs(payload.get("input"))
    data, prompt_tokens = [], 0
    for index, item in enumerate(inputs):
        if isinstance(item, str):
            words, prompt_tokens = _WORDS.findall(item.lower()), prompt_tokens + text_tokens(item)
        else:  # token ids: each id is a word
            words, prompt_tokens = [str(token) for token in item], prompt_tokens + len(item)
        vector = pseudo_embedding(words, dimensions)
        encoded: Any = vector.tolist()
        if encoding == "base64":
            encoded = base64.b64encode(vector.astype("<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _inputs(raw: Any) -> list[str | list[int]]:
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_token(t) for t in raw)):
        raw = [raw]  # one input
    if not isinstance(raw, list) or not raw or len(raw) > MAX_INPUTS:
        raise _invalid(f"'input' must be a string or an array of 1 to {MAX_INPUTS} inputs", "input")
    for item in raw:
        if isinstance(item, str) and item:
            continue
        if isinstance(item, list) and item and all(_is_token(t) for t in item):
            continue
        raise _invalid("'$.input' is invalid: each input must be a non-empty string or token array", "input")
    return raw


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _invalid(message: str, param: str | None) -> SimError:
    return SimError(400, message, "invalid_request_error", param=param)
