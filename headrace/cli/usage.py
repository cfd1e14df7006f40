"""``headrace usage``: the usage report of ``GET /v1/usage``, as a table, CSV or JSON."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated, Any

import typer

from headrace.cli.client import ApiKey, ApiUrl, _check, _client

FIGURES = (
    ("requests", "requests"),
    ("succeeded", "ok"),
    ("failed", "failed"),
    ("attempts", "calls"),
    ("input_tokens.sum", "tok in"),
    ("input_tokens.p95", "in p95/req"),
    ("cache_read_tokens", "cache read"),
    ("output_tokens.sum", "tok out"),
    ("output_tokens.p95", "out p95/req"),
    ("cost_usd", "cost USD"),
    ("served_from_cache", "cached"),
    ("saved_cost_usd", "saved USD"),
    ("overhead_cost_usd", "overhead USD"),
    ("cost_per_success_usd", "USD/success"),
)


def _value(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def rows_of(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the group's columns, then the figures; the last row is the total."""
    columns = [*report["group_by"], *([report["granularity"]] if report["granularity"] else [])]
    header = [*columns, *(label for _, label in FIGURES)]
    rows = []
    for row in [*report["data"], {"group": dict.fromkeys(columns, ""), **report["total"]}]:
        figures = ["" if _value(row, p) is None else str(_value(row, p)) for p, _ in FIGURES]
        rows.append([str(row["group"].get(c, "")) for c in columns] + figures)
    if columns:
        rows[-1][0] = "total"
    return header, rows


def usage(
    group_by: Annotated[
        str, typer.Option(help="tenant, route, deployment, priority, attribution keys.")
    ] = "",
    since: Annotated[str, typer.Option(help="Start: a time, or 30m / 24h / 7d / 2w before now.")] = "7d",
    until: Annotated[str | None, typer.Option(help="End (default now).")] = None,
    granularity: Annotated[str | None, typer.Option(help="day or hour.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Admin keys: one tenant only.")] = None,
    format: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """What the requests of a period cost, grouped: requests, calls, tokens, cost, the overhead of
    retries, fallbacks and lost calls, and cost per successful request."""
    if format not in ("table", "csv", "json"):
        typer.echo("error: --format: table, csv or json", err=True)
        raise typer.Exit(2)
    params = {
        "group_by": group_by,
        "since": since,
        "until": until,
        "granularity": granularity,
        "tenant": tenant,
    }
    with _client(api_url, api_key) as client:
        report = _check(client.get("/v1/usage", params={k: v for k, v in params.items() if v}))
    if format == "json":
        typer.echo(json.dumps(report, indent=2))
        return
    header, rows = rows_of(report)
    if format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Usage {report['since'][:19]} to {report['until'][:19]} UTC", title_justify="left")
    for name in header:
        table.add_column(name, justify="left" if name in report["group_by"] else "right")
    for index, row in enumerate(rows):
        table.add_row(*row, end_section=index == len(rows) - 2)
    Console().print(table)
