"""How each provider counts a call against its limits: at admission, and once it has ended.

OpenAI charges prompt tokens (its own estimate) + max_tokens x n against TPM at admission.
Anthropic charges input tokens against ITPM and reserves max_tokens against OTPM, adjusting to
the real output at the end; cache reads do not count. A request counts against RPM once admitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker_config.deployments import Deployment, TenantLimits
from workers.bucket import Charge, Observed, Settlement
from workers.estimate import estimate_prompt_tokens, requested_max_tokens
from workers.providers.base import CallFailed, ProviderReply

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
DEFAULT_PAUSE_S = 1.0  # a 429 without retry-after still pauses everyone this long


@dataclass(frozen=True)
class Estimate:
    """A call's size before it is made: estimated prompt tokens, and the output it may produce."""

    prompt_tokens: int
    output_tokens: int  # max_tokens x n: what the provider reserves


def estimate_call(deployment: Deployment, body: Mapping[str, Any], default_max_tokens: int) -> Estimate:
    completions = body["n"] if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    max_tokens = requested_max_tokens(body, deployment.max_output_tokens or default_max_tokens)
    return Estimate(estimate_prompt_tokens(body), max_tokens * completions)


def _by_limit(
    requests: float | None, tokens_in: float | None, tokens_out: float | None
) -> dict[str, float | None]:
    total = None if tokens_in is None or tokens_out is None else tokens_in + tokens_out
    return {"requests": requests, "tokens": total, "input_tokens": tokens_in, "output_tokens": tokens_out}


def admission_charges(deployment: Deployment, estimate: Estimate) -> list[Charge]:
    """What the call takes from each of the deployment's limits, before it is made."""
    costs = _by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    return [Charge(name, limit, costs[name] or 0.0) for name, limit in deployment.limits().items()]


def tenant_charges(tenant: TenantLimits | None, estimate: Estimate) -> list[Charge]:
    """The same call against a tenant's own ceiling: requests, and all its tokens together."""
    if tenant is None:
        return []
    costs = _by_limit(1, estimate.prompt_tokens, estimate.output_tokens)
    return [Charge(name, limit, costs[name] or 0.0) for name, limit in tenant.limits().items()]


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


def settlement(deployment: Deployment, estimate: Estimate, outcome: ProviderReply | CallFailed) -> Settlement:
    """What the call really counted, limit by limit, from how it ended."""
    observed = observed_limits(deployment, outcome.headers)
    if isinstance(outcome, ProviderReply):
        usage = outcome.usage
        # Anthropic does not count cache reads against its input limit.
        cached = usage.cache_read_tokens if deployment.provider == "anthropic" else 0
        used = _by_limit(1, usage.input_tokens - cached, usage.output_tokens)
        return Settlement(used=used, tenant_used=used, observed=observed)
    if outcome.status == 429:
        # Refused at the door: nothing counted. Everyone pauses for the provider's retry-after.
        nothing = _by_limit(0, 0, 0)
        return Settlement(
            used=nothing,
            tenant_used=nothing,
            observed=observed,
            rate_limited=True,
            pause_s=outcome.retry_after_s or DEFAULT_PAUSE_S,
        )
    if outcome.kind == "status":
        used = _by_limit(1, estimate.prompt_tokens, 0)  # admitted, then failed: no output
    elif outcome.kind in ("translation", "unavailable"):
        used = _by_limit(0, 0, 0)  # no call was made
    else:
        used = _by_limit(None, None, None)  # timeouts, cut connections: it may all have counted
    return Settlement(used=used, tenant_used=used, observed=observed)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None
