"""The ledger on both dialects: schema from migrations, idempotent worker writes, exact money."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest
from alembic import command
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from api.batch_input import BatchLine
from api.batch_service import BatchSpec, cancel_batch, create_batch
from broker_config.celery_app import configure
from broker_config.settings import Settings
from db.batch_state import load_counted
from db.engine import Database, is_transient
from db.migrate import alembic_config
from db.models import ApiKey, Attempt, Batch, LlmRequest, Tenant
from db.states import AttemptOutcome, BatchStatus, Priority, RequestStatus
from db.tenants import create_api_key, tenant_for_key
from db.types import utcnow
from headrace.embedded import free_port
from tests.infra.postgres import PostgresCluster
from workers import ledger, lost_calls
from workers.housekeeping import running_leases
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


CLAIM = lost_calls.Claim(estimate_lost=lambda *_: (100, Decimal("0.5")), max_deliveries=8)


def _start(
    db: Database, request_id: str, lease: str = "L1", max_deliveries: int = 8
) -> ledger.RunStart | None:
    """A run holding ``lease`` begins (in production only after taking the lease in Redis, so any
    earlier run of the request is dead)."""
    return ledger.begin_run(db, request_id, lease, replace(CLAIM, max_deliveries=max_deliveries))


def _attempt(db: Database, request_id: str, lease: str = "L1") -> int | None:
    return ledger.begin_attempt(
        db,
        request_id,
        lease,
        deployment="d1",
        provider="openai",
        model="m",
        estimated_input_tokens=10,
        worker="w1",
    )


@pytest.fixture(autouse=True)
def _dead_broker() -> None:
    """Publishing goes nowhere: these tests are about the ledger alone."""
    configure(Settings(redis_url="redis://127.0.0.1:1/0"))


def test_migrations_match_the_models(database_url: str) -> None:
    """Alembic finds nothing to autogenerate: the migration scripts and the models agree."""
    command.check(alembic_config(database_url))


def test_migration_0008_round_trips_and_old_keys_are_not_admin(database_url: str) -> None:
    """Down to 0007 and up again: a key written before 0008 comes back a tenant key, and a request
    row's tags start NULL (workers then attribute it by its batch's metadata)."""
    command.downgrade(alembic_config(database_url), "0007")
    engine = create_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO tenants (id, name, created_at) VALUES ('t1', 'old', :now)"), {"now": utcnow()}
        )
        conn.execute(
            text(
                "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, created_at) "
                "VALUES ('k1', 't1', :hash, 'hr_old', :now)"
            ),
            {"hash": "0" * 64, "now": utcnow()},
        )
    command.upgrade(alembic_config(database_url), "head")
    command.check(alembic_config(database_url))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT admin FROM api_keys WHERE id = 'k1'")).scalar_one() in (False, 0)
    engine.dispose()


def test_keys_are_stored_hashed_and_find_their_tenant(db: Database) -> None:
    """A key is shown once; the ledger keeps only its hash, and the key finds its tenant (and
    whether it is an admin key)."""
    new = create_api_key(db, "acme")
    second = create_api_key(db, "acme")
    admin = create_api_key(db, "ops", admin=True)
    with db.session() as session:
        assert tenant_for_key(session, new.key)[0].name == "acme"  # type: ignore[index]
        assert tenant_for_key(session, second.key)[0].id == new.tenant_id  # type: ignore[index]
        assert tenant_for_key(session, new.key + "x") is None
        assert tenant_for_key(session, new.key)[1] is False  # type: ignore[index]
        assert admin.admin and tenant_for_key(session, admin.key)[1] is True  # type: ignore[index]
        stored = [row.key_hash for row in session.scalars(select(ApiKey))]
    assert len(stored) == 3 and new.key not in stored and all(len(h) == 64 for h in stored)


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
    ledger.finish_attempt(db, rid, "L1", 1, result, end)
    ledger.finish_attempt(db, rid, "L1", 1, result, end)
    assert _start(db, rid) is None  # a redelivery of ended work does nothing
    with db.session() as session:
        batch = load_counted(session, batch_id)
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
            "L1",
            no,
            ledger.AttemptResult(AttemptOutcome.FAIL, 5, http_status=400, error={"message": "bad"}),
            ledger.RequestEnd(RequestStatus.FAILED, error={"message": "bad"}),
        )
    with db.session() as session:
        batch = load_counted(session, batch_id)
    assert batch.status == BatchStatus.COMPLETED and batch.failed_count == 2 and batch.ended_at is not None
    assert batch.cost_usd == 0


def test_attempt_numbers_continue_across_runs_and_lost_calls_get_estimated_cost(db: Database) -> None:
    """A call left in flight by a dead run gets its cost row (estimated); numbering goes on."""
    _, (rid, _) = _batch(db)
    _start(db, rid, "L1")
    assert _attempt(db, rid, "L1") == 1  # ...and the run dies here
    assert _start(db, rid, "L2") is not None  # the next run, once L1's lease has expired
    assert _attempt(db, rid, "L2") == 2
    with db.session() as session:
        lost = session.scalars(
            select(Attempt).where(Attempt.request_id == rid, Attempt.attempt_no == 1)
        ).one()
        request = session.get(LlmRequest, rid)
    assert lost.outcome == AttemptOutcome.LOST and lost.cost_estimated and lost.cost_usd == Decimal("0.5")
    assert (lost.input_tokens, lost.output_tokens, lost.lease) == (10, 100, "L1")
    assert request.deliveries == 2 and request.cost_usd == Decimal("0.5") and request.lease == "L2"


def test_unknown_price_is_recorded_as_unknown_not_zero(db: Database) -> None:
    """A call with no known price keeps cost NULL and is counted as unpriced on its batch."""
    batch_id, (rid, _) = _batch(db)
    _start(db, rid)
    no = _attempt(db, rid)
    assert no is not None
    ledger.finish_attempt(
        db,
        rid,
        "L1",
        no,
        ledger.AttemptResult(AttemptOutcome.SUCCESS, 5, usage=Usage(10, 5)),
        ledger.RequestEnd(RequestStatus.SUCCEEDED, response={}),
    )
    with db.session() as session:
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
        batch = load_counted(session, batch_id)
    assert attempt.cost_usd is None and batch.unpriced_attempts == 1 and batch.cost_usd == 0


def test_a_run_declared_dead_records_its_call_but_changes_nothing_else(db: Database) -> None:
    """L1 was wrongly declared dead and L2 took the request over. L1's answer still gets its cost
    row (the real figures replace the estimate), but every change of the request is guarded by
    its lease: L1 can no longer end, defer, hand back or start a call for it."""
    batch_id, (rid, _) = _batch(db)
    _start(db, rid, "L1")
    assert _attempt(db, rid, "L1") == 1
    assert _start(db, rid, "L2") is not None
    result = ledger.AttemptResult(AttemptOutcome.SUCCESS, 9, usage=Usage(40, 7), cost_usd=Decimal("0.25"))
    end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response={"id": "late"})
    assert ledger.finish_attempt(db, rid, "L1", 1, result, end) is False
    assert _attempt(db, rid, "L1") is None
    ledger.end_run(db, rid, "L1", ledger.RequestEnd(RequestStatus.FAILED, error={"message": "x"}))
    assert ledger.defer_run(db, rid, "L1") is False
    assert ledger.hand_back(db, rid, "L1", clean=True) is False
    assert lost_calls.requeue_orphan(db, rid, "L1", CLAIM) is False
    with db.session() as session:
        request = session.get(LlmRequest, rid)
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
        batch = load_counted(session, batch_id)
    assert (request.status, request.lease, request.published_at is not None) == ("running", "L2", False)
    assert (attempt.outcome, attempt.cost_usd, attempt.cost_estimated) == ("success", Decimal("0.25"), False)
    assert request.cost_usd == batch.cost_usd == Decimal("0.25") and batch.input_tokens == 40
    assert batch.succeeded_count == batch.failed_count == 0


def test_a_request_that_kills_its_run_every_time_ends_as_poison(db: Database) -> None:
    _, (rid, _) = _batch(db)
    assert _start(db, rid, "L1", max_deliveries=2) is not None
    assert _start(db, rid, "L2", max_deliveries=2) is not None
    assert _start(db, rid, "L3", max_deliveries=2) is None
    with db.session() as session:
        request = session.get(LlmRequest, rid)
    assert request.status == RequestStatus.FAILED and request.error["kind"] == "poison"  # type: ignore[index]


def test_orphans_and_hand_backs_return_to_the_outbox(db: Database) -> None:
    """The orphan sweep returns a dead run's request unpublished (a crash, still counted), guarded
    by that run's token; a Redis outage hands it back cleanly (not counted against the request)."""
    _, (rid, other) = _batch(db)
    _start(db, rid, "L1")
    _attempt(db, rid, "L1")
    assert running_leases(db) == {rid: "L1"}
    assert lost_calls.requeue_orphan(db, rid, "L0", CLAIM) is False
    assert lost_calls.requeue_orphan(db, rid, "L1", CLAIM) is True
    with db.session() as session:
        request = session.get(LlmRequest, rid)
        attempt = session.scalars(select(Attempt).where(Attempt.request_id == rid)).one()
    assert (request.status, request.published_at, request.lease, request.deliveries) == (
        "queued",
        None,
        None,
        1,
    )
    assert attempt.outcome == AttemptOutcome.LOST and attempt.cost_usd == Decimal("0.5")
    _start(db, other, "L9")
    assert ledger.hand_back(db, other, "L9", clean=True) is True
    with db.session() as session:
        assert session.get(LlmRequest, other).deliveries == 0  # type: ignore[union-attr]


def test_an_attempt_is_written_only_by_its_owner_and_never_in_a_cancelled_batch(db: Database) -> None:
    """begin_attempt numbers the attempts of the run that owns the request; another run's token
    gets no attempt; once the batch is cancelled, the run's next attempt ends the request
    cancelled instead, with no attempt row and its count unchanged."""
    batch_id, (rid, *_) = _batch(db)
    _start(db, rid, "L1")
    assert (_attempt(db, rid, "L1"), _attempt(db, rid, "L1"), _attempt(db, rid, "L0")) == (1, 2, None)
    cancel_batch(db, tenant_of(db, batch_id), batch_id)
    assert _attempt(db, rid, "L1") is None
    with db.session() as session:
        request = session.get(LlmRequest, rid)
        attempts = session.scalars(select(Attempt.attempt_no).where(Attempt.request_id == rid)).all()
        batch = load_counted(session, batch_id)
    assert request is not None and batch is not None
    assert (request.status, request.attempt_count, request.lease) == (RequestStatus.CANCELLED, 2, None)
    assert sorted(attempts) == [1, 2] and batch.cancelled_count == batch.total_count


@pytest.mark.parametrize("round_no", range(3))
def test_cancel_and_workers_share_one_lock_order(db: Database, round_no: int) -> None:
    """Runs beginning and ending requests of one batch while the batch is cancelled, with no
    retry of any write: the workers lock request then batch, and so does the cancel, so neither
    PostgreSQL nor SQLite ever reports a deadlock. (With the cancel locking the batch first,
    PostgreSQL reported one in about one round of three.)"""
    batch_id, ids = _batch(db, 60)
    no_retry = Database(db.url, hold_s=0)
    errors: list[BaseException] = []

    def work(rid: str) -> None:
        try:
            if ledger.begin_run(no_retry, rid, f"L-{rid}", CLAIM) is None:
                return
            no = ledger.begin_attempt(
                no_retry,
                rid,
                f"L-{rid}",
                deployment="d1",
                provider="openai",
                model="m",
                estimated_input_tokens=1,
                worker="w",
            )
            if no is not None:
                result = ledger.AttemptResult(
                    AttemptOutcome.SUCCESS, 1, usage=Usage(1, 1), cost_usd=Decimal(1)
                )
                end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response={})
                ledger.finish_attempt(no_retry, rid, f"L-{rid}", no, result, end)
        except Exception as exc:
            errors.append(exc)

    def cancel() -> None:
        try:
            cancel_batch(no_retry, tenant_of(db, batch_id), batch_id)
        except Exception as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(rid,)) for rid in ids]
    canceller = threading.Thread(target=cancel)
    # The last ten begin only once the cancel has returned, so that it always finds work to end
    # (seen: all 60 requests had succeeded before a late cancel, and the batch ended completed).
    early, late = workers[:-10], workers[-10:]
    early.insert(20 + 10 * round_no, canceller)
    for thread in early:
        thread.start()
    canceller.join()
    for thread in late:
        thread.start()
    for thread in early + late:
        thread.join()
    no_retry.dispose()
    assert not errors, errors[:3]
    with db.session() as session:
        batch = load_counted(session, batch_id)
    assert batch.status == BatchStatus.CANCELLED
    assert batch.succeeded_count + batch.cancelled_count == 60 and batch.cost_usd == batch.succeeded_count


def tenant_of(db: Database, batch_id: str) -> str:
    with db.session() as session:
        return session.get(Batch, batch_id).tenant_id  # type: ignore[union-attr]


def test_only_failures_worth_retrying_are_retried(database_url: str) -> None:
    """A duplicate key is the caller's bug and raised at once, even when its message says
    "connection" (the words once decided it); a dropped or refused connection, a deadlock or
    SQLite's lock is worth running the unit again. Decided by SQLSTATE class and SQLite result
    code, never by the message's words."""
    db = Database(database_url)
    create_api_key(db, "connection lost")
    started = time.monotonic()
    with pytest.raises(IntegrityError) as duplicate:
        db.transact(lambda s: s.add(Tenant(id="t_2", name="connection lost", created_at=utcnow())))
    assert not is_transient(duplicate.value) and time.monotonic() - started < 1
    if db.dialect == "sqlite":
        holder = sqlite3.connect(make_url(database_url).database or "", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        impatient = create_engine(database_url, connect_args={"timeout": 0})
        with pytest.raises(OperationalError) as locked, impatient.begin() as conn:
            conn.exec_driver_sql("INSERT INTO tenants (id, name, created_at) VALUES ('x', 'x', '2026-01-01')")
        holder.rollback()
        holder.close()
        impatient.dispose()
        assert is_transient(locked.value)
    else:
        refused = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
        with pytest.raises(OperationalError) as down:
            refused.transact(lambda s: s.execute(text("SELECT 1")), hold_s=0)
        assert is_transient(down.value)
        assert is_transient(_deadlock(db))
    db.dispose()


def _deadlock(db: Database) -> DBAPIError:
    """Two transactions that lock two rows in opposite orders: PostgreSQL kills one of them."""
    create_api_key(db, "a"), create_api_key(db, "b")
    barrier, failures = threading.Barrier(2), []

    def lock(first: str, second: str) -> None:
        try:
            with db.engine.begin() as conn:
                conn.execute(text("SELECT 1 FROM tenants WHERE name = :n FOR UPDATE"), {"n": first})
                barrier.wait()
                conn.execute(text("SELECT 1 FROM tenants WHERE name = :n FOR UPDATE"), {"n": second})
        except DBAPIError as exc:
            failures.append(exc)

    threads = [threading.Thread(target=lock, args=pair) for pair in (("a", "b"), ("b", "a"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 1
    return failures[0]


@pytest.mark.slow
def test_a_write_is_held_through_a_postgresql_outage(
    make_database_url: Callable[[str], str], postgres_cluster: PostgresCluster | None
) -> None:
    """PostgreSQL stops for 15 s, longer than the old fixed retry budget (about 6 to 11 s): a
    write given a 30 s hold waits it out and lands once."""
    if postgres_cluster is None or not postgres_cluster.restartable:
        pytest.skip("needs a PostgreSQL cluster the tests can stop and start")
    db = Database(make_database_url("postgresql"))
    create_api_key(db, "before")
    postgres_cluster.stop()
    timer = threading.Timer(15, postgres_cluster.start)
    timer.start()
    started = time.monotonic()
    try:
        db.transact(lambda s: s.add(Tenant(id="t_held", name="held", created_at=utcnow())), hold_s=30)
    finally:
        timer.join()
    assert 14.5 < time.monotonic() - started < 30
    with db.session() as session:
        assert session.scalars(select(Tenant.name).where(Tenant.id == "t_held")).all() == ["held"]
    db.dispose()


def test_a_worker_pool_without_pre_ping_writes_through_a_postgresql_restart(
    make_database_url: Callable[[str], str], postgres_cluster: PostgresCluster | None
) -> None:
    """Workers lend pooled connections without a pre-ping (it was a round trip before each of a
    request's three transactions): after PostgreSQL restarts, every pooled connection is dead, and
    a write meets one; ``transact`` starts again on a fresh one and lands once."""
    if postgres_cluster is None or not postgres_cluster.restartable:
        pytest.skip("needs a PostgreSQL cluster the tests can stop and start")
    db = Database(make_database_url("postgresql"), pre_ping=False)
    create_api_key(db, "before")  # a pooled connection, soon dead
    postgres_cluster.stop()
    postgres_cluster.start()
    db.transact(lambda s: s.add(Tenant(id="t_restart", name="restart", created_at=utcnow())), hold_s=30)
    with db.session() as session:
        assert session.scalars(select(Tenant.name).where(Tenant.id == "t_restart")).all() == ["restart"]
    db.dispose()
