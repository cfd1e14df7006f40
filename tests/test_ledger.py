"""The ledger on both dialects: schema from migrations, idempotent worker writes, exact money."""

from __future__ import annotations

from decimal import Decimal

import pytest
from alembic import command
from sqlalchemy import select

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from broker_config.celery_app import configure
from broker_config.settings import Settings
from db.engine import Database
from db.migrate import alembic_config
from db.models import ApiKey, Attempt, Batch, LlmRequest
from db.states import AttemptOutcome, BatchStatus, Priority, RequestStatus
from db.tenants import create_api_key, tenant_for_key
from workers import ledger
from workers.providers.base import Usage

BODY = {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}


def _batch(db: Database, n: int = 2) -> tuple[str, list[str]]:
    tenant = create_api_key(db, "acme").tenant_id
    lines = [BatchLine(i + 1, f"c{i}", "fast", BODY) for i in range(n)]
    # The broker URL points nowhere: the batch is committed anyway, and left for the sweep.
    batch = create_batch(db, BatchSpec(tenant, Priority.BULK, None, 3600), lines)
    with db.session() as session:
        ids = list(
            session.scalars(
                select(LlmRequest.id).where(LlmRequest.batch_id == batch.id).order_by(LlmRequest.line_no)
            )
        )
    return batch.id, ids


def _start(
    db: Database,
    request_id: str,
    worker: str = "w1",
    alive: tuple[str, ...] = ("w1",),
    max_deliveries: int = 8,
) -> ledger.RunStart | None:
    claim = ledger.Claim(
        worker=worker,
        owner_alive=lambda owner: owner in alive,
        stale_attempt_s=60,
        estimate_lost=lambda *_: Decimal("0.5"),
        estimated_output_tokens=lambda _body: 100,
        max_deliveries=max_deliveries,
    )
    return ledger.begin_run(db, request_id, claim)


def _attempt(db: Database, request_id: str, worker: str = "w1") -> int | None:
    return ledger.begin_attempt(
        db,
        request_id,
        deployment="d1",
        provider="openai",
        model="m",
        estimated_input_tokens=10,
        worker=worker,
    )


@pytest.fixture(autouse=True)
def _dead_broker() -> None:
    """Publishing goes nowhere: these tests are about the ledger alone."""
    configure(Settings(redis_url="redis://127.0.0.1:1/0"))


def test_migrations_match_the_models(database_url: str) -> None:
    """Alembic finds nothing to autogenerate: the migration scripts and the models agree."""
    command.check(alembic_config(database_url))


def test_keys_are_stored_hashed_and_find_their_tenant(db: Database) -> None:
    """A key is shown once; the ledger keeps only its hash, and the key finds its tenant."""
    new = create_api_key(db, "acme")
    second = create_api_key(db, "acme")
    with db.session() as session:
        assert tenant_for_key(session, new.key).name == "acme"
        assert tenant_for_key(session, second.key).id == new.tenant_id
        assert tenant_for_key(session, new.key + "x") is None
        stored = [row.key_hash for row in session.scalars(select(ApiKey))]
    assert len(stored) == 2 and new.key not in stored and all(len(h) == 64 for h in stored)


def test_a_batch_is_committed_even_when_the_broker_is_down(db: Database) -> None:
    """Every request is in the ledger, unpublished, for the sweep to send later."""
    batch_id, _ = _batch(db, 3)
    with db.session() as session:
        rows = list(session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id)))
    assert len(rows) == 3 and all(r.published_at is None and r.status == RequestStatus.QUEUED for r in rows)


def test_success_is_recorded_once_with_exact_cost(db: Database) -> None:
    """Finishing the same attempt twice (a redelivery) counts its tokens, cost and end once."""
    batch_id, (rid, _) = _batch(db)
    assert _start(db, rid) is not None
    no = _attempt(db, rid)
    assert no == 1
    result = ledger.AttemptResult(
        AttemptOutcome.SUCCESS, 12, http_status=200, usage=Usage(100, 20), cost_usd=Decimal("0.000123456")
    )
    end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response={"id": "x"}, deployment="d1")
    ledger.finish_attempt(db, rid, 1, result, end)
    ledger.finish_attempt(db, rid, 1, result, end)
    assert _start(db, rid) is None  # a redelivery of ended work does nothing
    with db.session() as session:
        batch = session.get(Batch, batch_id)
        request = session.get(LlmRequest, rid)
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
    assert (batch.succeeded_count, batch.input_tokens, batch.output_tokens) == (1, 100, 20)
    assert batch.cost_usd == Decimal("0.000123456") == request.cost_usd == attempt.cost_usd
    assert batch.status == BatchStatus.IN_PROGRESS
    assert request.status == RequestStatus.SUCCEEDED and request.deployment == "d1"


def test_batch_completes_when_its_last_request_ends(db: Database) -> None:
    """The batch turns completed, with an end time, in the transaction that ends its last request."""
    batch_id, ids = _batch(db)
    for rid in ids:
        _start(db, rid)
        no = _attempt(db, rid)
        assert no is not None
        ledger.finish_attempt(
            db,
            rid,
            no,
            ledger.AttemptResult(AttemptOutcome.FATAL, 5, http_status=400, error={"message": "bad"}),
            ledger.RequestEnd(RequestStatus.FAILED, error={"message": "bad"}),
        )
    with db.session() as session:
        batch = session.get(Batch, batch_id)
    assert batch.status == BatchStatus.COMPLETED and batch.failed_count == 2 and batch.ended_at is not None
    assert batch.cost_usd == 0


def test_attempt_numbers_continue_across_deliveries_and_lost_calls_get_estimated_cost(db: Database) -> None:
    """A call left in flight by a dead worker gets its cost row (estimated); numbering goes on."""
    _, (rid, _) = _batch(db)
    _start(db, rid)
    assert _attempt(db, rid) == 1  # ...and the worker dies here
    with db.write() as session:  # age the attempt past the staleness bound
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
        attempt.started_at = attempt.started_at.replace(year=2000)
    assert _start(db, rid) is not None  # the redelivery
    assert _attempt(db, rid) == 2
    with db.session() as session:
        lost = session.scalars(
            select(Attempt).where(Attempt.request_id == rid, Attempt.attempt_no == 1)
        ).one()
        request = session.get(LlmRequest, rid)
    assert lost.outcome == AttemptOutcome.LOST and lost.cost_estimated and lost.cost_usd == Decimal("0.5")
    assert (lost.input_tokens, lost.output_tokens) == (10, 100)
    assert request.deliveries == 2 and request.cost_usd == Decimal("0.5")


def test_unknown_price_is_recorded_as_unknown_not_zero(db: Database) -> None:
    """A call with no known price keeps cost NULL and is counted as unpriced on its batch."""
    batch_id, (rid, _) = _batch(db)
    _start(db, rid)
    no = _attempt(db, rid)
    assert no is not None
    ledger.finish_attempt(
        db,
        rid,
        no,
        ledger.AttemptResult(AttemptOutcome.SUCCESS, 5, usage=Usage(10, 5)),
        ledger.RequestEnd(RequestStatus.SUCCEEDED, response={}),
    )
    with db.session() as session:
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
        batch = session.get(Batch, batch_id)
    assert attempt.cost_usd is None and batch.unpriced_attempts == 1 and batch.cost_usd == 0


def test_a_duplicate_delivery_leaves_a_request_its_live_owner_runs(db: Database) -> None:
    """While w1's heartbeat lives, w2 gets nothing to do; once it stops, w2 takes over at once and
    w1's call in flight is costed as an estimate."""
    _, (rid, _) = _batch(db)
    assert _start(db, rid, "w1") is not None
    assert _attempt(db, rid, "w1") == 1
    assert _start(db, rid, "w2", alive=("w1", "w2")) is None
    assert _start(db, rid, "w2", alive=("w2",)) is not None
    with db.session() as session:
        request = session.get(LlmRequest, rid)
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
    assert request.owner == "w2" and request.deliveries == 2
    assert attempt.outcome == AttemptOutcome.LOST and attempt.cost_estimated


def test_a_request_that_kills_its_worker_every_time_ends_as_poison(db: Database) -> None:
    _, (rid, _) = _batch(db)
    assert _start(db, rid, "w1", max_deliveries=2) is not None
    assert _start(db, rid, "w2", alive=(), max_deliveries=2) is not None
    assert _start(db, rid, "w3", alive=(), max_deliveries=2) is None
    with db.session() as session:
        request = session.get(LlmRequest, rid)
    assert request.status == RequestStatus.FAILED and request.error["kind"] == "poison"  # type: ignore[index]


def test_returning_to_the_outbox(db: Database) -> None:
    """The recovery sweep returns a dead owner's request unpublished (a crash, still counted); a
    Redis outage returns it cleanly (not counted against the request)."""
    _, (rid, other) = _batch(db)
    _start(db, rid, "w1")
    assert ledger.running_owners(db) == {"w1": [rid]}
    assert ledger.return_to_outbox(db, [rid], clean=False, owner="w2") == 0
    assert ledger.return_to_outbox(db, [rid], clean=False, owner="w1") == 1
    with db.session() as session:
        request = session.get(LlmRequest, rid)
    assert (request.status, request.published_at, request.owner, request.deliveries) == (
        "queued",
        None,
        None,
        1,
    )
    _start(db, other, "w1")
    assert ledger.return_to_outbox(db, [other], clean=True) == 1
    with db.session() as session:
        assert session.get(LlmRequest, other).deliveries == 0  # type: ignore[union-attr]
