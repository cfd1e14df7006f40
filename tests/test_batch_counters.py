"""A batch's counters spread over shares (db/batch_state.py): requests ending at once on many
connections add to different rows, the sums are exact, and the batch ends once, even when its
last requests end in transactions that cannot see each other."""

from __future__ import annotations

import threading
from collections.abc import Callable
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.batch_service import get_batch
from db.batch_state import BatchDelta, apply_delta, counter_shard, load_counted
from db.engine import Database
from db.models import Attempt, BatchCounter
from db.states import AttemptOutcome, BatchStatus, RequestStatus
from db.types import utcnow
from tests.test_ledger import _attempt, _batch, _start, tenant_of
from workers import ledger
from workers.housekeeping import expire_batches
from workers.providers.base import Usage


def _run(db: Database, rid: str, cost: Decimal) -> None:
    assert _start(db, rid, f"L-{rid}") is not None
    no = _attempt(db, rid, f"L-{rid}")
    assert no is not None
    result = ledger.AttemptResult(AttemptOutcome.SUCCESS, 1, usage=Usage(10, 2), cost_usd=cost)
    end = ledger.RequestEnd(RequestStatus.SUCCEEDED, response={})
    ledger.finish_attempt(db, rid, f"L-{rid}", no, result, end)


def test_ends_on_many_connections_spread_over_shares_and_add_up_exactly(db: Database) -> None:
    """64 requests ended by 16 threads at once: their ends land on several shares, the batch's
    counters (its row plus its shares) equal the attempts' sums to the last digit, and the batch
    ended when its last request did."""
    batch_id, ids = _batch(db, 64)
    errors: list[BaseException] = []

    def work(chunk: list[str]) -> None:
        try:
            for i, rid in enumerate(chunk):
                _run(db, rid, Decimal("0.000000123") * (i + 1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(ids[k::16],)) for k in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]
    with db.session() as session:
        batch = get_batch(session, tenant_of(db, batch_id), batch_id)
        attempts_cost = session.scalar(select(func.sum(Attempt.cost_usd)))
        shares = session.scalars(select(BatchCounter.shard).where(BatchCounter.batch_id == batch_id)).all()
    assert batch.status == BatchStatus.COMPLETED and batch.ended_at is not None
    assert (batch.succeeded_count, batch.input_tokens, batch.output_tokens) == (64, 640, 128)
    assert batch.cost_usd == attempts_cost and batch.unpriced_attempts == 0
    # Integers as integers (PostgreSQL sums them as numeric): the webhook's JSON takes no Decimal.
    assert all(type(getattr(batch, n)) is int for n in ("succeeded_count", "input_tokens", "output_tokens"))
    assert set(shares) == {counter_shard(rid) for rid in ids} and len(shares) > 4


def _end_one(batch_id: str, rid: str) -> Callable[[Session], None]:
    def unit(session: Session) -> None:
        delta = BatchDelta()
        delta.ended(RequestStatus.SUCCEEDED)
        apply_delta(session, batch_id, delta, utcnow(), shard_key=rid)

    return unit


def test_the_last_two_ends_committed_side_by_side_end_the_batch_after_their_commits(
    db: Database,
) -> None:
    """Each of the last two ends is counted in a transaction that cannot see the other's: neither
    sees the batch done. Each looks again after its commit, and the later one ends it."""
    if db.engine.dialect.name == "sqlite":
        pytest.skip("SQLite runs one writer at a time: two ends never commit side by side")
    batch_id, (first, second) = _batch(db, 2)
    while counter_shard(first) == counter_shard(second):  # one share: the second would wait on the first
        batch_id, (first, second) = _batch(db, 2)
    counted, release = threading.Event(), threading.Event()

    def held_open(session: Session) -> None:
        _end_one(batch_id, first)(session)
        counted.set()
        assert release.wait(10)

    holder = threading.Thread(target=db.transact, args=(held_open,))
    holder.start()
    assert counted.wait(10)
    db.transact(_end_one(batch_id, second))  # sees one of two ended; its look after commit too
    with db.session() as session:
        assert load_counted(session, batch_id).status == BatchStatus.IN_PROGRESS  # type: ignore[union-attr]
    release.set()
    holder.join(10)
    with db.session() as session:
        batch = load_counted(session, batch_id)
    assert batch is not None and batch.status == BatchStatus.COMPLETED and batch.succeeded_count == 2


def test_a_batch_whose_last_end_was_never_looked_at_is_ended_by_the_sweep(db: Database) -> None:
    """Ends committed side by side whose looks after the commit never ran (their worker died in
    between): every request is counted as ended in the shares, the batch is still open, and the
    housekeeper's expiry sweep ends it."""
    batch_id, ids = _batch(db, 2)
    zero = {"failed_count": 0, "cancelled_count": 0, "expired_count": 0, "unpriced_attempts": 0}
    with db.write() as session:
        for index, _ in enumerate(ids):  # shares of their own: two ids may hash to one share
            share = BatchCounter(
                batch_id=batch_id,
                shard=100 + index,
                succeeded_count=1,
                **zero,
                input_tokens=10,
                output_tokens=2,
                cost_usd=Decimal("0.5"),
            )
            session.add(share)
    with db.session() as session:
        assert load_counted(session, batch_id).status == BatchStatus.IN_PROGRESS  # type: ignore[union-attr]
    assert expire_batches(db) == 1
    with db.session() as session:
        batch = load_counted(session, batch_id)
    assert batch is not None and batch.status == BatchStatus.COMPLETED
    assert (batch.succeeded_count, batch.input_tokens, batch.cost_usd) == (2, 20, Decimal(1))
    assert expire_batches(db) == 0
