"""``headrace``: run the stack's processes, manage keys, and talk to a running API."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from broker_config.deployments import ConfigError, load_config
from broker_config.settings import get_settings
from headrace.cli import client, top, usage
from headrace.cli.budgets import budgets_app
from headrace.cli.demo import demo
from headrace.cli.tenants import tenants_app

app = typer.Typer(
    name="headrace",
    no_args_is_help=True,
    add_completion=False,
    help="A self-hosted worker pool for LLM jobs. Settings come from HEADRACE_* variables.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Tenants' API keys.")
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(budgets_app, name="budgets")
app.command()(demo)
app.command()(client.submit)
app.command()(client.status)
app.command()(top.top)
app.command()(usage.usage)
app.command()(client.results)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _check_config() -> None:
    try:
        load_config(get_settings().config)
    except ConfigError as exc:
        _fail(str(exc))


def _check_visibility_timeout() -> None:
    """A delivery that outlives the broker's visibility timeout is delivered again while it runs."""
    from workers.pipeline import longest_run_s

    settings = get_settings()
    longest = longest_run_s(load_config(settings.config), settings)
    if longest >= settings.visibility_timeout_s:
        _fail(
            f"one request may run for up to {longest:.0f}s (attempts x chain x timeouts), longer than "
            f"HEADRACE_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s}: the broker would deliver it "
            f"again while it runs; raise it above {longest * 1.5:.0f}"
        )


@app.command()
def migrate() -> None:
    """Create or upgrade the ledger's schema (HEADRACE_DATABASE_URL)."""
    from db.migrate import upgrade

    url = get_settings().database_url
    upgrade(url)
    typer.echo(f"ledger schema is up to date ({url.split('@')[-1]})", err=True)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created on first use.")],
    admin: Annotated[
        bool, typer.Option(help="An admin key: it also reads every tenant's usage and spend.")
    ] = False,
) -> None:
    """Create an API key for TENANT and print it alone on stdout (it is shown only once)."""
    from db.engine import settings_database
    from db.tenants import create_api_key

    new = create_api_key(settings_database(get_settings()), tenant, admin=admin)
    typer.echo(new.key)
    if new.admin:
        typer.echo(f"an admin key (tenant {new.tenant_name}): it reads every tenant's usage", err=True)


@keys_app.command("secret")
def keys_secret(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    rotate: Annotated[
        bool, typer.Option(help="Replace the secret; receivers must switch to the new one.")
    ] = False,
) -> None:
    """Print TENANT's webhook signing secret (Standard Webhooks, "whsec_..."), alone on stdout."""
    from db.engine import settings_database
    from db.tenants import tenant_webhook_secret

    try:
        typer.echo(tenant_webhook_secret(settings_database(get_settings()), tenant, rotate=rotate))
    except LookupError as exc:
        _fail(str(exc))


@keys_app.command("webhook")
def keys_webhook(
    tenant: Annotated[str, typer.Option(help="Tenant name.")],
    url: Annotated[str, typer.Option(help="Default webhook URL for the tenant's batches ('' to remove).")],
) -> None:
    """Set where TENANT's batches report when they end, unless a batch names its own webhook."""
    from broker_config.webhook_urls import UnsafeWebhookUrl, check_webhook_url
    from db.engine import settings_database
    from db.tenants import set_tenant_webhook_url

    settings = get_settings()
    try:
        checked = check_webhook_url(url, settings.webhook_allow_hosts) if url else None
        set_tenant_webhook_url(settings_database(settings), tenant, checked)
    except (UnsafeWebhookUrl, LookupError) as exc:
        _fail(str(exc))
    typer.echo(f"tenant {tenant}: default webhook {'set to ' + url if url else 'removed'}", err=True)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(help="API processes.")] = 1,
) -> None:
    """Serve the HTTP API (docs at /docs)."""
    import uvicorn

    _check_config()
    from broker_config.logs import api_log_config

    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several API processes: each writes its counters where /metrics sums them (api/metrics_view.py).
        import tempfile

        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="headrace-api-metrics-")

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        # Our format in each API process, uvicorn's records included (broker_config/logs.py).
        log_config=api_log_config(),
    )


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(help="Threads (concurrent calls) in this process.")
    ] = None,
    queues: Annotated[
        str, typer.Option(help="Queues to consume, comma-separated.")
    ] = "interactive,default,bulk",
    name: Annotated[str | None, typer.Option(help="Worker node name (default: headrace-PID@host).")] = None,
    loglevel: Annotated[
        str | None, typer.Option(help="Log level (default: HEADRACE_LOG_LEVEL, else INFO).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="This worker's /metrics port (default: HEADRACE_WORKER_METRICS_PORT; 0: none)."),
    ] = None,
) -> None:
    """Run a worker: takes requests from the queues and calls the providers."""
    from celery.utils.nodenames import default_nodename, host_format

    from broker_config.celery_app import app as celery_app
    from broker_config.logs import configure_logging, resolve_format

    _check_config()
    _check_visibility_timeout()
    settings = get_settings()
    # Before Celery starts: its first warnings (running as root, say) come out as our log lines too.
    # Celery's setup_logging signal configures the same again once it runs (broker_config/celery_app.py).
    configure_logging(settings, level=(loglevel or settings.log_level).upper())
    logging.captureWarnings(True)
    threads = concurrency or settings.worker_concurrency
    # The worker sizes its ledger pool to its threads: it reads them from its settings.
    os.environ["HEADRACE_WORKER_CONCURRENCY"] = str(threads)
    if metrics_port is not None:
        os.environ["HEADRACE_WORKER_METRICS_PORT"] = str(metrics_port)
    get_settings.cache_clear()
    # Built as Celery's ``worker`` command builds it (``app.Worker``), without parsing an argv through
    # Celery's command line, which imports every other command with it (~0.15 s per worker).
    worker = celery_app.Worker(
        hostname=host_format(default_nodename(name or f"headrace-{os.getpid()}@%h")),
        pool_cls="threads",
        concurrency=threads,
        queues=queues.split(","),
        loglevel=(loglevel or settings.log_level).upper(),
        # Celery's start-up banner is for a terminal: it would break a file of JSON lines.
        quiet=resolve_format(settings) == "json",
        without_mingle=True,
        without_gossip=True,
        # Task events only when asked (HEADRACE_WORKER_TASK_EVENTS); Flower switches them on itself.
        task_events=settings.worker_task_events,
    )
    worker.start()
    raise typer.Exit(worker.exitcode or 0)


@app.command()
def flower(
    address: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
) -> None:
    """Serve Flower for the worker pool (queues, workers, tasks)."""
    from broker_config.celery_app import app as celery_app

    settings = get_settings()
    argv = ["flower", f"--address={address}", f"--port={port}", "--purge_offline_workers=60"]
    if settings.flower_basic_auth:
        argv.append(f"--basic_auth={settings.flower_basic_auth}")
    elif _is_loopback(address):
        # Flower refuses its HTTP API without auth unless told; on loopback only, we tell it.
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    else:
        _fail("set HEADRACE_FLOWER_BASIC_AUTH=user:password to serve Flower beyond loopback")
    celery_app.start(argv)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
)
def simulate(ctx: typer.Context) -> None:
    """Run the provider simulator (OpenAI and Anthropic dialects); --help lists its options."""
    from headrace.simulator.__main__ import main as simulator_main

    simulator_main(list(ctx.args))


@app.command()
def check_config(path: Annotated[Path | None, typer.Argument(help="Deployments file.")] = None) -> None:
    """Check a deployments file and list its routes."""
    try:
        config = load_config(path or get_settings().config)
    except ConfigError as exc:
        _fail(str(exc))
        return
    for route in config.routes:
        typer.echo(f"{route.name}: {' -> '.join(route.deployments)}")
