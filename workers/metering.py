"""How each provider counts a call against its limits, before it (the offline estimate) and after
it (``settlement``: what it really counted, and what the provider's headers forecast).

OpenAI charges prompt tokens (its own offline estimate) + max_tokens x n against TPM at
admission. Anthropic charges input tokens against ITPM and reserves max_tokens against OTPM,
adjusting to the real output at the end; cache reads do not count against ITPM. On a deployment
with ``learn_output``, the OTPM reservation is the route's learned output instead
(``workers/output_estimate.py``), and the settlement records what the call really produced. A request counts
against RPM once admitted. A 429 counted nothing. The decision flow that uses this is
``workers/admission.py``; this part stands apart only to keep that module one readable page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker_config.deployments import Deployment
from workers.forecast import Forecast, forecasts
from workers.providers.base import CallFailed, ProviderReply, Usage

DEFAULT_PAUSE_S = 1.0  # a 429 without a usable retry-after still pauses everyone this long
# The longest a 429 pauses a deployment for every worker. A per-minute limit refills well within
# it; a longer retry-after (a spent quota, or a garbage value) pauses it again at the next 429
# rather than holding a deployment shut on one header's word.
MAX_PAUSE_S = 300.0

# The offline prompt estimate: a character heuristic (about four characters per token of English,
# plus a few tokens of framing per message) is what OpenAI itself admits with. No tokenizer
# download, no network; within tens of percent, and it errs high (README, "Rate limits").
CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4
TOKENS_PER_REPLY = 3


def by_limit(
    requests: float | None, tokens_in: float | None, tokens_out: float | None
) -> dict[str, float | None]:
    """One call's amounts under the name of every limit it can count against (None: unknown)."""
    total = None if tokens_in is None or tokens_out is None else tokens_in + tokens_out
    return {"requests": requests, "tokens": total, "input_tokens": tokens_in, "output_tokens": tokens_out}


@dataclass(frozen=True)
class Settlement:
    """How a call ended, for the bucket.

    ``used``: per limit, what the call really counted (None keeps the reservation as charged,
    when we cannot know, e.g. after a timeout). ``tenant_used`` likewise for the tenant's ceiling.
    ``observed``: the provider's forecast of each limit, from the answer's headers.
    ``age_s``: how long before the settlement the provider answered. Its durations (resets,
    retry-after) count from its answer, and the ledger is written first: a settlement that waited
    seconds for a busy database must not push the moment a window's room returns that much later
    (seen: an answer settled 3.7 s late told a "new" window, and 5 calls met 429s in the old one).
    """

    used: Mapping[str, float | None]
    tenant_used: Mapping[str, float | None] = field(default_factory=dict)
    observed: Mapping[str, Forecast] = field(default_factory=dict)
    rate_limited: bool = False
    pause_s: float = 0.0
    age_s: float = 0.0
    # A call that answered: the output it really produced, a sample of its route's (None: it did
    # not answer; workers/output_estimate.py).
    output_tokens: int | None = None


def settlement_of(
    deployment: Deployment, prompt_tokens: int, outcome: ProviderReply | CallFailed
) -> Settlement:
    """What the call really counted, limit by limit, from how it ended (``prompt_tokens``: the
    estimate it was admitted with)."""
    observed = forecasts(deployment, outcome.headers)
    if isinstance(outcome, ProviderReply):
        usage = outcome.usage
        used = by_limit(1, counted_input_tokens(deployment, usage), usage.output_tokens)
        return Settlement(used=used, tenant_used=used, observed=observed, output_tokens=usage.output_tokens)
    if outcome.status == 429:
        # Refused at the door: nothing counted. Everyone pauses for the provider's retry-after.
        nothing = by_limit(0, 0, 0)
        return Settlement(
            used=nothing,
            tenant_used=nothing,
            observed=observed,
            rate_limited=True,
            pause_s=min(outcome.retry_after_s or DEFAULT_PAUSE_S, MAX_PAUSE_S),
        )
    if outcome.kind == "status":
        used = by_limit(1, prompt_tokens, 0)  # admitted, then failed: no output
    elif outcome.kind in ("translation", "unavailable"):
        used = by_limit(0, 0, 0)  # no call was made
    else:
        used = by_limit(None, None, None)  # timeouts, cut connections: it may all have counted
    return Settlement(used=used, tenant_used=used, observed=observed)


def counted_input_tokens(deployment: Deployment, usage: Usage) -> int:
    """The input tokens a provider's limit counted for a call that answered."""
    # Anthropic does not count cache reads against its input limit.
    cached = usage.cache_read_tokens if deployment.provider == "anthropic" else 0
    return usage.input_tokens - cached


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
