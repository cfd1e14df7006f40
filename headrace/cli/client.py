"""CLI commands that talk to a running API: submit, status, results."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from broker_config.settings import get_settings
from headrace.cli.progress import follow_batches

ApiUrl = Annotated[str | None, typer.Option(help="API base URL [HEADRACE_API_URL].")]
ApiKey = Annotated[str | None, typer.Option(help="API key [HEADRACE_API_KEY].")]


def _client(api_url: str | None, api_key: str | None) -> httpx.Client:
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
            final = follow_batches(lambda i: _check(http.get(f"/v1/batches/{i}")), [batch["id"]])[batch["id"]]
            counts = final["request_counts"]
            typer.echo(
                f"{final['status']}: {counts['completed']} completed, {counts['failed']} failed, "
                f"cost ${final['cost_usd']}",
                err=True,
            )


def status(batch_id: str, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Show a batch: status, request counts, tokens and cost (JSON)."""
    with _client(api_url, api_key) as http:
        typer.echo(json.dumps(_check(http.get(f"/v1/batches/{batch_id}")), indent=2))


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
