"""``headrace budgets set|list|delete``: tenants' spend budgets, kept in the ledger (what
``/v1/budgets`` manages, for an operator on a host with the ledger's settings)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from broker_config.settings import get_settings

budgets_app = typer.Typer(no_args_is_help=True, help="Tenants' spend budgets and their ladders.")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _changed() -> None:
    from broker_config.budget_state import budgets_changed
    from broker_config.redis_clients import state_client

    budgets_changed(state_client(get_settings(), socket_timeout=2, socket_connect_timeout=2))


@budgets_app.command("set")
def budgets_set(
    name: Annotated[str, typer.Argument(help="The budget's name, unique per tenant.")],
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    limit: Annotated[str, typer.Option(help="What the period may spend, in USD.")],
    period: Annotated[str, typer.Option(help="day or month (UTC).")] = "month",
    tag: Annotated[str | None, typer.Option(help="Only requests with this tag, e.g. feature=search.")] = None,
    ladder: Annotated[
        str | None,
        typer.Option(help="Steps action@share: e.g. 'defer@0.8,downgrade@0.9:smart>fast,refuse@1'."),
    ] = None,
    on_anomaly: Annotated[
        str, typer.Option(help="none, or pause the tenant's bulk and default work.")
    ] = "none",
) -> None:
    """Create or replace TENANT's budget NAME."""
    from db.budgets import BudgetError, set_budget
    from db.engine import settings_database

    try:
        rule = set_budget(
            settings_database(get_settings()),
            tenant,
            name,
            limit_usd=limit,
            period=period,
            tag=tag,
            ladder=ladder,
            on_anomaly=on_anomaly,
        )
    except BudgetError as exc:
        _fail(str(exc))
        return
    _changed()
    steps = ", ".join(s.text() for s in rule.ladder)
    typer.echo(
        f"budget {rule.name} ({rule.scope}): {rule.limit_usd} USD per {rule.period}; ladder {steps}", err=True
    )


@budgets_app.command("list")
def budgets_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    format: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Every budget and where it stands this period."""
    from sqlalchemy import select

    from api.budget_view import budget_views
    from broker_config.redis_clients import state_client
    from db.budgets import budget_rules
    from db.engine import settings_database
    from db.models import Tenant

    settings = get_settings()
    client = state_client(settings, socket_timeout=2, socket_connect_timeout=2)
    with settings_database(settings).session() as session:
        ids = (
            None if tenant is None else list(session.scalars(select(Tenant.id).where(Tenant.name == tenant)))
        )
        views = [v.as_json() for v in budget_views(session, client, budget_rules(session, ids))]
    if format == "json":
        typer.echo(json.dumps(views, indent=2))
        return
    if format != "table":
        _fail(f"--format: table or json, not {format!r}")
    table = Table(
        "tenant", "budget", "tag", "period", "limit USD", "spent USD", "in flight", "used", "steps", "resets"
    )
    for v in views:
        share = "" if v["used_share"] is None else f"{v['used_share']:.0%}"
        steps = ", ".join(f"{s['action']}@{s['at']:g}" for s in v["ladder"])
        reached = ", ".join(v["steps_reached"])
        table.add_row(
            v["tenant"],
            v["name"],
            v["tag"] or "",
            v["period"],
            v["limit_usd"],
            v["spent_usd"],
            v["in_flight_usd"],
            share,
            f"{steps}" + (f" [bold]({reached})[/]" if reached else ""),
            v["resets_at"],
        )
    Console().print(table)


@budgets_app.command("delete")
def budgets_delete(
    name: Annotated[str, typer.Argument(help="The budget's name.")],
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
) -> None:
    """Delete TENANT's budget NAME."""
    from db.budgets import delete_budget
    from db.engine import settings_database

    if not delete_budget(settings_database(get_settings()), tenant, name):
        _fail(f"tenant {tenant!r} has no budget named {name!r}")
    _changed()
    typer.echo(f"budget {name} of {tenant} deleted", err=True)
