"""``headrace demo``: the embedded stack, a demo batch through the HTTP API, and its bill."""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

# Imported where used: every ``headrace`` command imports this module, and the stack, the ledger
# and rich would cost each of them (``keys create``, ``migrate``, ``worker``) most of a second.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from db.reports import UsageRow
    from headrace.stack import EmbeddedStack

TOPICS = [
    "the water wheel",
    "token buckets",
    "priority queues",
    "retry budgets",
    "circuit breakers",
    "cost accounting",
    "the Rhine",
    "mill races",
    "backpressure",
    "idempotent writes",
    "exponential backoff",
    "rate limit headers",
    "batch APIs",
    "fallback chains",
    "Postgres",
]
STYLES = ["Explain in one paragraph", "Write a haiku about", "Give three facts about", "Summarise", "Define"]


def demo_requests(count: int, route: str, seed: int) -> list[dict[str, Any]]:
    """A seeded, varied workload: prompt lengths and max_tokens differ from line to line."""
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        topic = rng.choice(TOPICS)
        padding = " ".join(rng.choices(TOPICS, k=rng.randint(0, 40)))
        body: dict[str, Any] = {
            "model": route,
            "messages": [
                {"role": "system", "content": "You are a terse engineer."},
                {"role": "user", "content": f"{rng.choice(STYLES)} {topic}. Context: {padding}"},
            ],
            "max_tokens": rng.choice([32, 64, 128, 256]),
        }
        lines.append({"custom_id": f"{route}-{i:04d}", "body": body})
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _usage_table(title: str, rows: list[UsageRow], first: str, done: str) -> Table:
    from rich.table import Table

    from db.reports import percentile

    table = Table(title=title, title_justify="left")
    streamed = any(row.first_chunks_ms for row in rows)  # deployments with stream = true
    names = (first, done, "failed", "p50", "p95", *(("TTFT p50/p95",) if streamed else ()))
    for name in (*names, "tok in", "tok out", "cost USD"):
        table.add_column(name, justify="left" if name == first else "right", no_wrap=True)
    for row in rows:
        cost = f"{row.cost_usd:.6f}" + (f" (+{row.unpriced} unpriced)" if row.unpriced else "")
        first_chunk = f"{_ms(percentile(row.first_chunks_ms, 50))}/{_ms(percentile(row.first_chunks_ms, 95))}"
        table.add_row(
            row.name,
            str(row.done),
            str(row.failed),
            _ms(row.percentile_ms(50)),
            _ms(row.percentile_ms(95)),
            *((first_chunk,) if streamed else ()),
            f"{row.input_tokens:,}",
            f"{row.output_tokens:,}",
            cost,
        )
    return table


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def demo(
    keep_running: Annotated[
        bool, typer.Option(help="Leave the stack up; print its URLs and an API key.")
    ] = False,
    requests: Annotated[int, typer.Option(help="Requests in the demo (split over two batches).")] = 200,
    home: Annotated[Path, typer.Option(help="Working directory (wiped at start).")] = Path(".headrace/demo"),
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 300.0,
) -> None:
    """Run Redis, the provider simulator, the API and a worker here, and push a demo batch through."""
    from rich.console import Console

    from headrace.embedded import StartupError
    from headrace.stack import EmbeddedStack

    console = Console()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    shutil.rmtree(home, ignore_errors=True)
    stack = EmbeddedStack(home, with_flower=keep_running)
    code = 0
    try:
        with console.status("starting redis, simulator, API and worker..."):
            stack.start()
        console.print(
            f"stack up: API {stack.api_url}, simulator {stack.simulator_url}, logs in {home / 'logs'}"
        )
        code = _run_demo(stack, requests, timeout, console)
        if keep_running:
            console.print(
                f"\n[bold]Stack running.[/] API docs: {stack.api_url}/docs   Flower: {stack.flower_url}\n"
                f"API key: {stack.api_key}\n"
                f"Try: curl -H 'Authorization: Bearer {stack.api_key}' {stack.api_url}/v1/batches\n"
                "Ctrl-C stops everything."
            )
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        console.print("interrupted: stopping everything the demo started")
        code = 130
    except StartupError as exc:
        console.print(f"[red]could not start the stack:[/] {exc}")
        code = 1
    finally:
        with console.status("stopping..."):
            stack.stop()
    raise typer.Exit(code)


def _run_demo(stack: EmbeddedStack, count: int, timeout_s: float, console: Console) -> int:
    import httpx

    from db.engine import get_database
    from db.reports import by_deployment, by_route
    from headrace.cli.progress import follow_batches

    interactive = count * 2 // 5
    plan = [("fast", "interactive", interactive, 1), ("smart", "bulk", count - interactive, 2)]
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as http:
        batch_ids, labels = [], []
        for route, priority, n, seed in plan:
            response = http.post(
                "/v1/batches",
                json={
                    "requests": demo_requests(n, route, seed),
                    "priority": priority,
                    "metadata": {"source": "headrace demo"},
                },
            )
            response.raise_for_status()
            batch_ids.append(response.json()["id"])
            labels.append(f"{route} ({priority})")
        final = follow_batches(
            lambda i: http.get(f"/v1/batches/{i}").raise_for_status().json(),
            batch_ids,
            labels=labels,
            timeout_s=timeout_s,
            console=console,
        )
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    with db.session() as session:
        routes, deployments = by_route(session, batch_ids), by_deployment(session, batch_ids)
    console.print(_usage_table("Per route: requests", routes, "route", "done"))
    console.print(_usage_table("Per deployment: provider calls", deployments, "deployment", "ok"))
    unfinished = [b["id"] for b in final.values() if b["status"] != "completed"]
    if unfinished:
        console.print(f"[red]batches not completed within {timeout_s:.0f}s:[/] {', '.join(unfinished)}")
        return 1
    return 0
