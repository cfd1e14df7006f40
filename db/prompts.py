"""A request's prompt hash: the same model and prompt from one tenant over and over is how a
runaway loop shows (workers/anomalies.py). Kept on each request row (``requests.prompt_hash``),
computed once at accept."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# The canonical body's prompt, whichever shape it has: chat messages, a completion prompt, an input.
PROMPT_FIELDS = ("messages", "prompt", "input")
# Compact and without sorting keys: a client repeating itself sends the same keys in the same
# order, and this runs for every line at accept (about 4 us a line).
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def prompt_hash(model: str, body: Mapping[str, Any]) -> str | None:
    """16 hex digits (64 bits) of the model and the prompt; sampling settings (temperature,
    max_tokens...) left out, since a loop that varies only those is still a loop. None when the
    body carries no prompt."""
    prompt = next((body[name] for name in PROMPT_FIELDS if body.get(name) is not None), None)
    if prompt is None:
        return None
    return hashlib.sha256(_ENCODE([model, prompt]).encode()).hexdigest()[:16]
