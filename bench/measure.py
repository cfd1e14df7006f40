"""What the benchmarks share: reading a process's CPU time and waiting for a batch to end."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLOCK_TICKS


def wait_batch(
    http: httpx.Client,
    batch_id: str,
    *,
    timeout_s: float,
    poll_s: float,
    on_view: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll a native batch until it is no longer in progress (or the timeout passes); ``on_view``
    sees every view polled."""
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = http.get(f"/v1/batches/{batch_id}").json()
        if on_view is not None:
            on_view(view)
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


def cpu_seconds_of(command: str) -> float:
    """User + system CPU of every process whose name is ``command`` (e.g. all of PostgreSQL's
    backends), those that have exited since not counted."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1 : text.rindex(")")] == command:
            total += sum(int(f) for f in text.rsplit(")", 1)[1].split()[11:15]) / CLOCK_TICKS
    return total


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ResourceSampler:
    """Samples every ``interval_s`` while running: the RSS of some processes, and (given a
    PostgreSQL URL) how many connections the database has. ``mark`` notes the sample index a
    moment falls at (warm-up over, downloads started)."""

    def __init__(
        self, pids: dict[str, int], database_url: str | None = None, interval_s: float = 1.0
    ) -> None:
        import threading

        self.pids = pids
        self.url = database_url.replace("postgresql+psycopg", "postgresql") if database_url else None
        self.interval_s = interval_s
        self.rss: list[dict[str, float]] = []
        self.connections: list[int] = []
        self.marks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = None
        if self.url:
            import psycopg

            conn = psycopg.connect(self.url, autocommit=True)
        query = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        try:
            while True:
                self.rss.append({name: rss_mb(pid) for name, pid in self.pids.items()})
                if conn is not None:
                    row = conn.execute(query).fetchone()
                    self.connections.append(int(row[0]) if row else 0)
                if self._stop.wait(self.interval_s):
                    return
        finally:
            if conn is not None:
                conn.close()

    def mark(self, name: str) -> None:
        self.marks[name] = len(self.rss)

    def rss_of(self, name: str, since: str | None = None, until: str | None = None) -> list[float]:
        start, end = self.marks.get(since or "", 0), self.marks.get(until or "", len(self.rss))
        return [sample[name] for sample in self.rss[start:end]]

    def __enter__(self) -> ResourceSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def redis_counters(url: str) -> tuple[dict[str, int], float, int]:
    """Commands a Redis has run, by command (INFO commandstats; a script's own commands are counted
    too), the CPU seconds it has used, and the bytes it has received and sent."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
        cpu = client.info("cpu")
        net = client.info("stats")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    cpu_s = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return calls, cpu_s, int(net["total_net_input_bytes"]) + int(net["total_net_output_bytes"])


def postgres_commits(database_url: str) -> int:
    """Transactions committed in the database so far (pg_stat_database)."""
    import psycopg

    with psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0
