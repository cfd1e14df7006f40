"""Celery tasks: thin shells that hand a request id to the pipeline."""

from __future__ import annotations

import logging
import os
import socket
from functools import lru_cache
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from broker_config.celery_app import app
from broker_config.deployments import load_config
from broker_config.queues import RUN_REQUEST_TASK
from broker_config.settings import get_settings
from db.engine import get_database
from workers.pipeline import Deps, run_request
from workers.providers import default_adapters
from workers.sweeper import PublisherSweep

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def default_deps() -> Deps:
    """Built once per worker process: one engine, one SDK client per endpoint, shared by threads."""
    settings = get_settings()
    return Deps(
        db=get_database(settings.database_url),
        config=load_config(settings.config),
        settings=settings,
        adapters=default_adapters(),
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )


@app.task(name=RUN_REQUEST_TASK)
def run_request_task(request_id: str) -> None:
    run_request(request_id, default_deps())


_sweeps: list[PublisherSweep] = []


@worker_ready.connect
def _start_sweep(**_: Any) -> None:
    deps = default_deps()
    sweep = PublisherSweep(deps.db, deps.settings)
    sweep.start()
    _sweeps.append(sweep)


@worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    for sweep in _sweeps:
        sweep.stop()
