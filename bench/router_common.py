"""What both sides of bench/router_compare.py share: the jobs, their results, and how CPU is counted."""

from __future__ import annotations

import contextlib
import itertools
import random
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds
from bench.rate_limits import VOCABULARY
from headrace.simulator.buckets import Rules
from headrace.simulator.config import SimConfig
from headrace.simulator.ideal import ideal_span
from headrace.simulator.tokens import count_prompt_tokens

UNLIMITED = 1_000_000_000  # a deployment's rpm / tpm far above anything a run reaches
MAX_TOKENS = 256


@dataclass
class Job:
    name: str
    lines: list[dict[str, Any]]
    sim: SimConfig
    rpm: int
    tpm: int


@dataclass
class Result:
    side: str
    job: str
    requests: int
    wall_s: float = 0.0  # from the first process started to the last one stopped
    job_s: float = 0.0
    ok: int = 0
    calls: int = 0
    refused: int = 0  # 429s the provider answered
    startup: dict[str, float] = field(default_factory=dict)  # per process: CPU when its side was ready
    in_job: dict[str, float] = field(default_factory=dict)  # per process: CPU from ready to the job's end
    total: dict[str, float] = field(default_factory=dict)  # per process: CPU from start to exit
    client_cpu_s: float = 0.0
    note: str = ""
    # Per --timeline-s of the job: the side's CPU, and the provider's admitted and refused calls.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def cpu_total(self) -> float:
        return sum(self.total.values())

    @property
    def cpu_job(self) -> float:
        return sum(self.in_job.values())


def workload(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choices(VOCABULARY, k=rng.randint(20, 620)))
        body = {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def ideal_of(job: Job) -> float:
    costs = [
        {"requests": 1, "tokens": count_prompt_tokens(line["body"]["messages"]) + MAX_TOKENS}
        for line in job.lines
    ]
    return ideal_span(costs, {"requests": job.rpm, "tokens": job.tpm}, Rules(job.sim.limiter, 60.0, None))


def children_cpu() -> float:
    """User + system CPU of every child this process has reaped so far (and of what they reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reaped_cpu(stop: Callable[[], object]) -> float:
    """The CPU of the one child that ``stop`` stops and reaps: its whole life, teardown included."""
    before = children_cpu()
    stop()
    return children_cpu() - before


def provider_counts(url: str) -> tuple[int, int, list[dict[str, Any]]]:
    """The provider's calls, its 429s, and its call records."""
    stats = httpx.get(f"{url}/_sim/stats", params={"records": 20_000}, timeout=60).json()
    received = stats["received"].get("openai", 0)
    return received, stats["answered"].get("openai", {}).get("429", 0), stats["records"]


class CpuTimeline(threading.Thread):
    """Samples the summed CPU of some processes every second while the job runs."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, float]] = []  # (epoch s, CPU-s)
        self._finished = threading.Event()

    def read(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), self.read()))
            if self._finished.wait(1.0):
                self.samples.append((time.time(), self.read()))
                return

    def __enter__(self) -> CpuTimeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished.set()
        self.join(10)

    def per_step(self, step_s: float, records: list[dict[str, Any]]) -> list[tuple[float, int, int]]:
        """Per ``step_s`` from the first sample: CPU-s used, calls admitted, calls refused (429)."""
        if len(self.samples) < 2:
            return []
        t0, end = self.samples[0][0], self.samples[-1][0]
        steps = []
        start = t0
        while start < end - 1e-6:
            stop = min(start + step_s, end)
            cpu = self._at(stop) - self._at(start)
            inside = [r for r in records if start <= r["t"] < stop]
            steps.append((cpu, sum(r["admitted"] for r in inside), sum(r["status"] == 429 for r in inside)))
            start = stop
        return steps

    def _at(self, t: float) -> float:
        """CPU-s at ``t``, linear between the samples around it."""
        for (t1, c1), (t2, c2) in itertools.pairwise(self.samples):
            if t1 <= t <= t2:
                return c1 + (c2 - c1) * ((t - t1) / (t2 - t1) if t2 > t1 else 0.0)
        return self.samples[-1][1]
