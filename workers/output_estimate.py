"""Learned output reservations: how much output a call on a deployment reserves, from what calls of
its route really produced there, instead of its whole output cap (max_tokens x n).

Where it applies is a fact about how the provider counts, limit by limit (``LEARNABLE``):

- **OpenAI** counts the prompt estimate + max_tokens x n against TPM when the request arrives: a
  request whose cap does not fit the room left is refused (429) however short its answer. Headrace
  keeps reserving the whole cap on OpenAI deployments; reserving less only moves the 429 to them.
- **Anthropic** counts input tokens against ITPM, and output tokens against OTPM. Where the
  provider counts the output a call really generates, the OTPM room a call holds while it runs can
  be what calls of its route really produce, not its max_tokens. Where it holds max_tokens of OTPM
  from the start (api-compat.md 5.4 says Anthropic does, and the simulator does so unless told
  ``otpm_counts = "output"``), a learned reservation lets through calls the provider refuses:
  measured in ``bench/rate_limits.py --workload short-answers``. So it is the deployment's
  ``learn_output`` that turns it on, where the operator knows the provider counts real output.

Per deployment and route, the real output of each call that answered (per completion: output / n)
is pushed on a capped list in Redis, ``keys.output_samples`` under the deployment's hash tag, by
the settlement's own script (``lua/bucket_settle.lua``: no extra round trip, and no sample can fail
a settlement). Once the list holds ``samples_min`` samples, admission reserves on the learnable
limits, per completion, the samples' ``quantile`` (nearest rank: p99 of 50 samples is their
largest) x ``margin``, never under ``floor_tokens`` and never over the cap. Each process reads the
figure at most every ``refresh_s`` per deployment and route: admission adds no round trip per call.
A call that outputs more than it reserved is charged the rest at its settlement, as debt the
bucket refills before it grants again. Budgets (cost reservations), tenant ceilings and OpenAI's
TPM keep the worst case.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from broker_config import keys
from broker_config.deployments import Deployment
from broker_config.settings import Settings

__all__ = [
    "LEARNABLE",
    "OutputEstimates",
    "OutputPolicy",
    "OutputSample",
    "Sampling",
    "learnable_limits",
    "learned_per_completion",
]

log = logging.getLogger(__name__)

# Per provider, the limits that can count a call's real output rather than its max_tokens.
# OpenAI's TPM takes max_tokens x n at the door: none.
LEARNABLE: dict[str, tuple[str, ...]] = {"openai": (), "anthropic": ("output_tokens",)}


def learnable_limits(deployment: Deployment) -> tuple[str, ...]:
    """The deployment's limits on which admission may reserve the learned output."""
    if not deployment.learn_output:
        return ()
    limits = deployment.limits()
    return tuple(name for name in LEARNABLE.get(deployment.provider, ()) if name in limits)


@dataclass(frozen=True)
class OutputPolicy:
    samples_min: int = 50  # below this many samples the whole cap is reserved
    samples_kept: int = 1000  # the latest this many are kept, per deployment and route
    quantile: float = 0.99
    margin: float = 1.2
    floor_tokens: int = 32  # per completion
    refresh_s: float = 5.0  # how long a process uses a figure before it reads it again
    keep_s: float = 7 * 86400.0  # a route's samples go this long after its last answer

    @classmethod
    def from_settings(cls, settings: Settings) -> OutputPolicy:
        return cls(
            samples_min=settings.output_samples_min,
            samples_kept=settings.output_samples_kept,
            quantile=settings.output_quantile,
            margin=settings.output_margin,
            floor_tokens=settings.output_floor_tokens,
            refresh_s=settings.output_refresh_s,
        )


def learned_per_completion(samples: Sequence[int], policy: OutputPolicy) -> int | None:
    """The quantile x margin of the samples (nearest rank), or None while they are too few."""
    if not samples or len(samples) < min(policy.samples_min, policy.samples_kept):
        return None
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(policy.quantile * len(ordered))))
    return math.ceil(ordered[rank - 1] * policy.margin)


@dataclass(frozen=True)
class Sampling:
    """Where a call's real output is recorded once it answered: its route's samples."""

    key: str
    completions: int

    def sample(self, output_tokens: int) -> OutputSample:
        return OutputSample(self.key, math.ceil(max(0, output_tokens) / self.completions))


@dataclass(frozen=True)
class OutputSample:
    """One call's real output per completion, for the settlement script to push on ``key``."""

    key: str
    tokens: int


class OutputEstimates:
    """One per process (the Bucket's): the learned figures, each read at most every refresh_s."""

    def __init__(
        self, client: redis.Redis, policy: OutputPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = client
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._figures: dict[str, tuple[float, int | None]] = {}  # key -> (read at, per completion)

    def sampling(self, deployment: Deployment, route: str, completions: int) -> Sampling | None:
        """Where the call's output is recorded (None: the deployment learns nothing)."""
        if not learnable_limits(deployment):
            return None
        return Sampling(keys.output_samples(deployment.name, route or "-"), max(1, completions))

    def reservation(
        self, deployment: Deployment, route: str, cap_tokens: int, completions: int
    ) -> int | None:
        """Output tokens the learnable limits reserve for a call (``cap_tokens``: its max_tokens
        per completion); None: the whole cap (nothing to learn from yet, or not learnable)."""
        if not learnable_limits(deployment):
            return None
        learned = self._learned(keys.output_samples(deployment.name, route or "-"))
        if learned is None:
            return None
        per_completion = min(cap_tokens, max(self.policy.floor_tokens, learned))
        return per_completion * max(1, completions)

    def _learned(self, key: str) -> int | None:
        now = self._clock()
        with self._lock:
            seen = self._figures.get(key)
            if seen is not None and now - seen[0] < self.policy.refresh_s:
                return seen[1]
            # This thread reads it; the others meanwhile keep the figure they had.
            self._figures[key] = (now, None if seen is None else seen[1])
        try:
            raw = self.redis.lrange(key, 0, self.policy.samples_kept - 1)
            figure = learned_per_completion([int(x) for x in raw], self.policy)
        except (redis.RedisError, ValueError) as exc:
            # The take that follows meets the same Redis; until then the old figure holds.
            log.warning("could not read the learned output of %s (%s)", key, exc)
            return None if seen is None else seen[1]
        with self._lock:
            self._figures[key] = (now, figure)
        return figure
