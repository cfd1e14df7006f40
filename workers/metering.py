"""How each provider counts a call against its limits: the pure table that admission reads.

OpenAI charges prompt tokens (its own offline estimate) + max_tokens x n against TPM at
admission. Anthropic charges input tokens against ITPM and reserves max_tokens against OTPM,
adjusting to the real output at the end; cache reads do not count against ITPM. A request counts
against RPM once admitted. The decision flow that uses this table is ``workers/admission.py``;
this part stands apart only to keep that module one readable page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker_config.deployments import Deployment
from workers.providers.base import Usage

# Header names per provider and limit: (limit header, remaining header).
_HEADERS = {
    "openai": {
        "requests": ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"),
        "tokens": ("x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens"),
    },
    "anthropic": {
        "requests": ("anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining"),
        "input_tokens": (
            "anthropic-ratelimit-input-tokens-limit",
            "anthropic-ratelimit-input-tokens-remaining",
        ),
        "output_tokens": (
            "anthropic-ratelimit-output-tokens-limit",
            "anthropic-ratelimit-output-tokens-remaining",
        ),
        "tokens": ("anthropic-ratelimit-tokens-limit", "anthropic-ratelimit-tokens-remaining"),
    },
}

# The offline prompt estimate: a character heuristic (about four characters per token of English,
# plus a few tokens of framing per message) is what OpenAI itself admits with. No tokenizer
# download, no network; within tens of percent, and it errs high (README, "Rate limits").
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


@dataclass(frozen=True)
class Observed:
    """What the provider's headers said of one limit (None: not said)."""

    limit: int | None = None
    remaining: int | None = None


def by_limit(
    requests: float | None, tokens_in: float | None, tokens_out: float | None
) -> dict[str, float | None]:
    """One call's amounts under the name of every limit it can count against (None: unknown)."""
    total = None if tokens_in is None or tokens_out is None else tokens_in + tokens_out
    return {"requests": requests, "tokens": total, "input_tokens": tokens_in, "output_tokens": tokens_out}


def counted_input_tokens(deployment: Deployment, usage: Usage) -> int:
    """The input tokens a provider's limit counted for a call that answered."""
    # Anthropic does not count cache reads against its input limit.
    cached = usage.cache_read_tokens if deployment.provider == "anthropic" else 0
    return usage.input_tokens - cached


def observed_limits(deployment: Deployment, headers: Mapping[str, str]) -> dict[str, Observed]:
    """What the provider's rate-limit headers say of each of the deployment's limits."""
    table = _HEADERS[deployment.provider]
    seen: dict[str, Observed] = {}
    for name in deployment.limits():
        limit_header, remaining_header = table[name]
        limit, remaining = _int(headers.get(limit_header)), _int(headers.get(remaining_header))
        if limit is not None or remaining is not None:
            seen[name] = Observed(limit=limit, remaining=remaining)
    return seen


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """Estimated prompt tokens of a canonical (Chat Completions) body."""
    total = TOKENS_PER_REPLY
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE + math.ceil(len(_text_of(message.get("content"))) / CHARS_PER_TOKEN)
        if message.get("tool_calls"):
            total += math.ceil(len(json.dumps(message["tool_calls"])) / CHARS_PER_TOKEN)
    if body.get("tools"):
        total += math.ceil(len(json.dumps(body["tools"])) / CHARS_PER_TOKEN)
    return total


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return json.dumps(content)


def _int(value: str | None) -> int | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    # A header saying "inf" or "nan" says nothing.
    return int(number) if number is not None and math.isfinite(number) else None
