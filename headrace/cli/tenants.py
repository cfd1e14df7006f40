"""``headrace tenants``: a tenant's anomaly settings and pause, on the ledger directly (as ``keys``):
``set NAME --on-anomaly pause|none``, ``pause NAME``, ``resume NAME``, ``show NAME``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

from broker_config.settings import get_settings

tenants_app = typer.Typer(no_args_is_help=True, help="Tenants: what their anomalies do, pause and resume.")
Name = Annotated[str, typer.Argument(help="Tenant name.")]


def _apply(call: Callable[..., dict[str, Any]], *args: Any) -> None:
    from db.engine import settings_database

    try:
        view = call(settings_database(get_settings()), *args)
    except (LookupError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(view, indent=2))


@tenants_app.command("show")
def show(name: Name) -> None:
    """Print the tenant's on_anomaly and whether it is paused (JSON)."""
    from db.events import show_tenant

    _apply(show_tenant, name)


@tenants_app.command("set")
def set_(
    name: Name,
    on_anomaly: Annotated[
        str, typer.Option("--on-anomaly", help="pause: an anomaly holds its bulk and default work; none.")
    ],
) -> None:
    """Set what the tenant's anomalies do besides their event and webhook."""
    from db.events import set_on_anomaly

    _apply(set_on_anomaly, name, on_anomaly)


@tenants_app.command("pause")
def pause(
    name: Name,
    reason: Annotated[
        str, typer.Option(help="Why, for its requests and its view.")
    ] = "paused by an operator",
) -> None:
    """Hold the tenant's bulk and default work now (interactive goes on)."""
    from db.events import pause_tenant

    _apply(pause_tenant, name, reason)


@tenants_app.command("resume")
def resume(name: Name) -> None:
    """Let the tenant's held work go on (each held request within HEADRACE_HOLD_RECHECK_S)."""
    from db.events import resume_tenant

    _apply(resume_tenant, name)
