"""Following batches to their end with a live progress bar."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

ENDED = {"completed", "cancelled", "expired", "failed"}


def follow_batches(
    fetch: Callable[[str], dict[str, Any]],
    batch_ids: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    timeout_s: float = 3600.0,
    poll_s: float = 0.5,
    console: Console | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll each batch until it ends (or ``timeout_s`` passes); returns the last view of each."""
    latest: dict[str, dict[str, Any]] = {}
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/]"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        tasks = {
            batch_id: progress.add_task(labels[i] if labels else batch_id, total=None, ok=0, failed=0)
            for i, batch_id in enumerate(batch_ids)
        }
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for batch_id, task in tasks.items():
                batch = fetch(batch_id)
                latest[batch_id] = batch
                counts = batch["request_counts"]
                done = counts["total"] - counts["in_progress"]
                progress.update(
                    task,
                    total=counts["total"],
                    completed=done,
                    ok=counts["completed"],
                    failed=counts["failed"],
                )
            if all(b["status"] in ENDED for b in latest.values()):
                break
            time.sleep(poll_s)
    return latest
