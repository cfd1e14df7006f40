"""``headrace top``: the pool live in a terminal, from ``GET /v1/queues`` and ``GET /v1/deployments``.

Per priority: messages waiting and the age of the oldest. Per deployment: breaker, bucket fill per
limit, calls in flight, waits and 429s (totals, and their rate since the last frame), fallbacks to
it, and the calls, tokens and cost of the last minute. Rates are differences between two frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import typer

from headrace.cli.client import ApiKey, ApiUrl, _check, _client

if TYPE_CHECKING:
    import httpx
    from rich.console import Group

BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


@dataclass
class Frame:
    """One reading of the pool, and the counters of the reading before (for rates)."""

    queues: dict[str, Any]
    deployments: dict[str, Any]
    at: float
    before: dict[str, tuple[float, dict[str, int]]] = field(default_factory=dict)


def read(client: httpx.Client) -> Frame:
    return Frame(_check(client.get("/v1/queues")), _check(client.get("/v1/deployments")), time.monotonic())


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m" if seconds < 3600 else f"{seconds / 3600:.1f}h"


def _fill(limit: dict[str, Any]) -> str:
    effective = float(limit["effective"]) or 1.0
    share = max(0.0, min(1.0, float(limit["level"]) / effective))
    bar = "█" * round(share * 10) + "·" * (10 - round(share * 10))
    learned = f" (learned {limit['learned']})" if limit.get("learned") else ""
    return f"{limit['name']} {bar} {share:4.0%} of {effective:,.0f}{learned}"


def render(frame: Frame) -> Group:
    from rich.console import Group
    from rich.table import Table

    queues = Table(title="Queues", title_justify="left", expand=False)
    for column in ("priority", "waiting", "oldest"):
        queues.add_column(column, justify="right" if column != "priority" else "left")
    for queue in frame.queues["data"]:
        queues.add_row(queue["priority"], f"{queue['depth']:,}", _age(float(queue["oldest_age_s"])))
    queues.add_row("parked", f"{frame.queues['delayed_requests']:,}", "", style="dim")

    fallbacks: dict[str, int] = {}
    for counts in frame.deployments.get("fallbacks", {}).values():
        for name, n in counts.items():
            fallbacks[name] = fallbacks.get(name, 0) + n
    table = Table(title="Deployments", title_justify="left")
    columns = ["deployment", "breaker", "bucket", "in flight", "waits/s", "429s", "fallbacks", "calls/min"]
    for column in [*columns, "tokens/min", "cost/min"]:
        table.add_column(column, justify="left" if column in ("deployment", "breaker", "bucket") else "right")
    for state in frame.deployments["data"]:
        name = state["name"]
        seen_at, counters = frame.before.get(name, (frame.at, {}))
        elapsed = max(frame.at - seen_at, 1e-9)
        waits_rate = (state["waits"] - counters.get("waits", state["waits"])) / elapsed
        new_429 = state["rate_limited"] - counters.get("rate_limited", state["rate_limited"])
        minute = state.get("last_minute", {})
        breaker = state["breaker"]
        paused = f" paused {state['paused_for_s']:.0f}s" if state["paused_for_s"] > 0 else ""
        table.add_row(
            f"{name}\n[dim]{state['model']}[/dim]",
            f"[{BREAKER_STYLE.get(breaker, '')}]{breaker}[/]{paused}",
            "\n".join(_fill(limit) for limit in state["limits"]),
            str(state["in_flight_calls"]),
            f"{waits_rate:.1f}",
            f"{state['rate_limited']:,}" + (f" [red]+{new_429}[/]" if new_429 else ""),
            f"{fallbacks.get(name, 0):,}",
            f"{minute.get('calls', 0):,}",
            f"{minute.get('input_tokens', 0) + minute.get('output_tokens', 0):,}",
            f"${minute.get('cost_usd', '0')}",
        )
    return Group(queues, table)


def remember(frame: Frame) -> dict[str, tuple[float, dict[str, int]]]:
    keys = ("waits", "rate_limited", "grants")
    return {s["name"]: (frame.at, {k: int(s[k]) for k in keys}) for s in frame.deployments["data"]}


def top(
    interval: Annotated[float, typer.Option(help="Seconds between frames.", min=0.2)] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """The pool live: queues by priority, and each deployment's bucket, breaker, waits, 429s,
    fallbacks, tokens and cost per minute (Ctrl-C to leave)."""
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with _client(api_url, api_key) as client:
        frame = read(client)
        if once:
            console.print(render(frame))
            return
        with Live(render(frame), console=console, refresh_per_second=4, screen=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    before = remember(frame)
                    frame = read(client)
                    frame.before = before
                    live.update(render(frame))
            except KeyboardInterrupt:
                pass
