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


class LockWaitSampler:
    """Samples PostgreSQL every ``interval_s`` while running: how many sessions wait on a lock held
    by another transaction (a hot row shows up here), and on which relation."""

    QUERY = (
        "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*) FILTER (WHERE state = 'active')"
        " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )

    def __init__(self, database_url: str, interval_s: float = 0.05) -> None:
        import threading

        self.url = database_url.replace("postgresql+psycopg", "postgresql")
        self.interval_s = interval_s
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(self.interval_s):
                waiting, active = conn.execute(self.QUERY).fetchone() or (0, 0)
                self.samples.append((int(waiting), int(active)))

    def __enter__(self) -> LockWaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        if not self.samples:
            return "no samples"
        waiting = [w for w, _ in self.samples]
        active = [a for _, a in self.samples]
        busy = sum(1 for w in waiting if w) / len(waiting)
        return (
            f"sessions waiting on a lock: mean {sum(waiting) / len(waiting):.2f} of "
            f"{sum(active) / len(active):.1f} active, max {max(waiting)}; "
            f"{busy:.0%} of {len(waiting)} samples had one waiting"
        )
