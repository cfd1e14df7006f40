"""Queues on a real broker: interactive work overtakes queued bulk work, Flower sees the pool,
and requests committed but never published are published by the sweep."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import func, select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from broker_config.celery_app import configure
from broker_config.settings import Settings
from db.engine import get_database
from db.models import Attempt, Batch, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from headrace.stack import EmbeddedStack
from tests.test_end_to_end import lines, wait_ended


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("queues"),
        worker_concurrency=1,
        with_flower=True,
        simulator_args=("--latency-ms", "40"),
        extra_env={"HEADRACE_PUBLISH_GRACE_S": "1", "HEADRACE_SWEEP_INTERVAL_S": "0.5"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _starts(stack: EmbeddedStack, batch_id: str) -> list[datetime]:
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).session() as session:
        return list(
            session.scalars(
                select(Attempt.started_at)
                .join(LlmRequest, LlmRequest.id == Attempt.request_id)
                .where(LlmRequest.batch_id == batch_id)
                .order_by(Attempt.started_at)
            )
        )


@pytest.mark.slow
def test_interactive_requests_overtake_queued_bulk_ones_and_flower_sees_it(
    stack: EmbeddedStack, http: httpx.Client
) -> None:
    """One busy worker, 200 bulk requests queued: 5 interactive ones submitted afterwards start
    before the remaining bulk ones (attempt start times). Flower shows the worker and the queues."""
    bulk = http.post("/v1/batches", json={"requests": lines(200, "b", ("fast",)), "priority": "bulk"}).json()[
        "id"
    ]
    deadline = time.monotonic() + 30
    while len(_starts(stack, bulk)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)

    flower = httpx.get(f"{stack.flower_url}/api/queues/length", timeout=10).json()
    queues = {q["name"]: q["messages"] for q in flower["active_queues"]}
    assert set(queues) == {"interactive", "default", "bulk"} and queues["bulk"] > 100, queues
    workers = httpx.get(f"{stack.flower_url}/api/workers", params={"refresh": "1"}, timeout=10).json()
    assert any(name.startswith("worker1@") for name in workers), workers

    submitted_at = datetime.now(UTC)
    urgent = http.post(
        "/v1/batches", json={"requests": lines(5, "i", ("fast",)), "priority": "interactive"}
    ).json()
    wait_ended(http, [bulk, urgent["id"]], timeout_s=120)

    urgent_starts = _starts(stack, urgent["id"])
    bulk_starts = _starts(stack, bulk)
    assert len(urgent_starts) == 5
    overtaken_by = [t for t in bulk_starts if submitted_at <= t < max(urgent_starts)]
    # At most the bulk request a free slot had already fetched; all the rest waited.
    assert len(overtaken_by) <= 1, (len(overtaken_by), urgent_starts)
    assert sum(t > max(urgent_starts) for t in bulk_starts) >= 150


def test_requests_committed_but_never_published_are_published_by_the_sweep(stack: EmbeddedStack) -> None:
    """A crash (here: an unreachable broker) between commit and publish loses nothing: a worker's
    publisher sweep finds the unpublished rows and the requests run."""
    database_url = stack.env["HEADRACE_DATABASE_URL"]
    db = get_database(database_url)
    configure(Settings(redis_url="redis://127.0.0.1:1/0", database_url=database_url))
    tenant = create_api_key(db, "outbox").tenant_id
    body = {"model": "fast", "messages": [{"role": "user", "content": "x"}]}
    lines = [BatchLine(i + 1, f"o{i}", "fast", body) for i in range(10)]
    batch = create_batch(db, BatchSpec(tenant, Priority.DEFAULT, None, 3600), lines)
    with db.session() as session:
        unpublished = session.scalar(
            select(func.count())
            .select_from(LlmRequest)
            .where(LlmRequest.batch_id == batch.id, LlmRequest.published_at.is_(None))
        )
    assert unpublished == 10
    deadline = time.monotonic() + 60
    status = ""
    while time.monotonic() < deadline:
        with db.session() as session:
            status = session.get(Batch, batch.id).status  # type: ignore[union-attr]
        if status == "completed":
            break
        time.sleep(0.3)
    assert status == "completed"
