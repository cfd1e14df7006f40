"""What a workload would need from a limiter at best, and what it took: the yardsticks of the
rate-limit benchmark and tests.

``ideal_span``: a clairvoyant client that holds exactly the limit (it knows the limiter's shape,
window and state, and what the provider will charge each call) admits the calls in order, each at
the first moment the limiter would let it in, with no latency and no concurrency limit. The span
from its first admission to its last is the least any client can need for these calls in this
order. It is computed by the simulator's own windows (``buckets.build_windows``) on a virtual
clock, so the yardstick and the limiter are one piece of code. The costs are what the provider
charges at admission (OpenAI: 1 request, and its prompt count + max_tokens); the yardstick is
exact when every call uses its whole reservation (the benchmark's answers do), and a bound that
ignores refunds otherwise.

``admission_span``: first to last admission at the provider, from the simulator's call records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from headrace.simulator.buckets import Rules, Window, build_windows


def ideal_span(costs: Sequence[Mapping[str, int]], limits: Mapping[str, int], rules: Rules) -> float:
    """Seconds from the first admission to the last, for ``costs`` (per call: limit name -> amount)
    admitted in order under ``limits`` (per minute) enforced with ``rules``."""
    windows: dict[str, list[Window]] = {
        name: build_windows(rules, limit, 0.0) for name, limit in limits.items()
    }
    now = 0.0
    for cost in costs:
        while True:
            waits = [
                window.wait_s(cost.get(name, 0), now) for name, group in windows.items() for window in group
            ]
            if any(wait is None for wait in waits):
                raise ValueError(f"a call costing {dict(cost)} can never fit {dict(limits)}")
            longest = max((wait for wait in waits if wait is not None), default=0.0)
            if longest <= 0:
                break
            now += longest
        for name, group in windows.items():
            for window in group:
                window.take(cost.get(name, 0), now)
    return now


def admission_span(records: Sequence[Mapping[str, Any]], model: str | None = None) -> float:
    """First to last admission (seconds) among the simulator's call records (of ``model``)."""
    times = [r["t"] for r in records if r["admitted"] and (model is None or r["model"] == model)]
    return max(times) - min(times) if times else 0.0
