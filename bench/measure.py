"""What the benchmarks share: reading a process's CPU time and waiting for a batch to end."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def wait_batch(http: httpx.Client, batch_id: str, *, timeout_s: float, poll_s: float) -> dict[str, Any]:
    """Poll a native batch until it is no longer in progress (or the timeout passes)."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = http.get(f"/v1/batches/{batch_id}").json()
        if view["status"] != "in_progress":
            break
        time.sleep(poll_s)
    return view
