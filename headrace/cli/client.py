"""CLI commands that talk to a running API: submit, status, results."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker_config.settings import get_settings

# httpx and rich are imported where used: every ``headrace`` command imports this module.
if TYPE_CHECKING:
    import httpx
    from rich.table import Table

ApiUrl = Annotated[str | None, typer.Option(help="API base URL [HEADRACE_API_URL].")]
ApiKey = Annotated[str | None, typer.Option(help="API key [HEADRACE_API_KEY].")]


def _client(api_url: str | None, api_key: str | None) -> httpx.Client:
    import httpx

    settings = get_settings()
    key = api_key or settings.api_key
    if not key:
        typer.echo("error: no API key: pass --api-key or set HEADRACE_API_KEY", err=True)
        raise typer.Exit(2)
    return httpx.Client(
        base_url=api_url or settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=120.0
    )


def _check(response: httpx.Response) -> Any:
    if response.status_code < 400:
        return response.json()
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        typer.echo(f"error: HTTP {response.status_code}: {response.text[:500]}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"error: {error.get('message')}", err=True)
    for item in error.get("errors") or []:
        where = f"line {item['line']}" if item.get("line") is not None else ""
        cid = f" (custom_id {item['custom_id']!r})" if item.get("custom_id") else ""
        typer.echo(f"  {where}{cid}: {item.get('message')}", err=True)
    raise typer.Exit(1)


def _lines_with_route(path: Path, route: str | None) -> Iterator[bytes]:
    """The file's lines, with body.model set to ``route``; lines we cannot read pass unchanged
    so that the API reports them with their line number."""
    with path.open("rb") as handle:
        for raw in handle:
            if route:
                try:
                    line = json.loads(raw)
                    if isinstance(line, dict) and isinstance(line.get("body"), dict):
                        line["body"]["model"] = route
                        raw = json.dumps(line).encode() + b"\n"
                except json.JSONDecodeError:
                    pass
            yield raw if raw.endswith(b"\n") else raw + b"\n"


def submit(
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="JSONL: {custom_id, body} per line.")
    ],
    route: Annotated[str | None, typer.Option(help="Route for every line (sets body.model).")] = None,
    priority: Annotated[str, typer.Option(help="interactive | default | bulk")] = "default",
    wait: Annotated[bool, typer.Option(help="Show progress until the batch ends.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Submit a JSONL file as a batch; prints the batch id on stdout."""
    with _client(api_url, api_key) as http:
        batch = _check(
            http.post(
                "/v1/batches",
                params={"priority": priority},
                content=_lines_with_route(file, route),
                headers={"Content-Type": "application/jsonl"},
            )
        )
        typer.echo(batch["id"])
        if wait:
            from headrace.cli.progress import follow_batches

            final = follow_batches(lambda i: _check(http.get(f"/v1/batches/{i}")), [batch["id"]])[batch["id"]]
            counts = final["request_counts"]
            typer.echo(
                f"{final['status']}: {counts['completed']} completed, {counts['failed']} failed, "
                f"cost ${final['cost_usd']}",
                err=True,
            )


def status(
    batch_id: Annotated[str | None, typer.Argument(help="A batch id.")] = None,
    deployments: Annotated[
        bool, typer.Option("--deployments", help="Show every deployment's bucket.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Show a batch (status, counts, tokens, cost), or with --deployments the rate-limit buckets."""
    if not deployments and batch_id is None:
        typer.echo("error: give a batch id, or --deployments", err=True)
        raise typer.Exit(2)
    with _client(api_url, api_key) as http:
        if not deployments:
            typer.echo(json.dumps(_check(http.get(f"/v1/batches/{batch_id}")), indent=2))
            return
        state = _check(http.get("/v1/deployments"))
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    from rich.console import Console

    Console().print(deployments_table(state))


def deployments_table(state: dict[str, Any]) -> Table:
    from rich.table import Table

    table = Table(
        title=f"Deployments ({state['delayed_requests']} request(s) waiting for room)", title_justify="left"
    )
    for column in (
        "deployment",
        "limit",
        "per min",
        "effective",
        "left",
        "in flight",
        "refill",
        "paused",
        "rate",
        "grants",
        "waits",
        "429s",
    ):
        table.add_column(
            column, justify="left" if column in ("deployment", "limit") else "right", no_wrap=True
        )
    for dep in state["data"]:
        for i, limit in enumerate(dep["limits"]):
            learned = f" (provider: {limit['learned']})" if limit["learned"] else ""
            first = i == 0
            table.add_row(
                dep["name"] if first else "",
                limit["name"],
                f"{limit['configured']:,}{learned}",
                f"{limit['effective']:,.0f}",
                f"{limit['level']:,.0f}",
                f"{limit['in_flight']:,.0f}",
                _refill(limit),
                f"{dep['paused_for_s']:.1f}s" if first and dep["paused_for_s"] else "",
                f"{dep['rate_factor']:.0%}" if first and dep["rate_factor"] < 1 else "",
                str(dep["grants"]) if first else "",
                str(dep["waits"]) if first else "",
                str(dep["rate_limited"]) if first else "",
            )
    return table


def _refill(limit: dict[str, Any]) -> str:
    """How the limit's room comes back, as the provider's headers last told it."""
    if limit["shape"] != "steps":
        return "continuous"
    back = limit["room_back_in_s"]
    return f"steps, back in {back:.1f}s" if back > 0 else "steps"


def results(
    batch_id: str,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="File to write (default: stdout).")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a batch's results as JSONL, streamed."""
    with _client(api_url, api_key) as http, http.stream("GET", f"/v1/batches/{batch_id}/results") as response:
        if response.status_code >= 400:
            response.read()
            _check(response)
        sink = output.open("wb") if output else sys.stdout.buffer
        try:
            for chunk in response.iter_bytes():
                sink.write(chunk)
        finally:
            if output:
                sink.close()
