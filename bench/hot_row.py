"""How many counter updates per second PostgreSQL commits on one row, against the same number
spread over several rows: the ceiling of one batch's counters, which every request's last ledger
transaction updates (``db/batch_state.py``: one atomic UPDATE, last, so the row lock is held only
until the commit).

A row lock is held until its transaction's commit has reached the WAL on disk, so updates of one
row go one at a time, each waiting for the previous one's flush; spread over rows they share the
flushes (group commit).

    python bench/hot_row.py --database-url postgresql://postgres@127.0.0.1:5432/postgres --connections 16

Then the same through the ledger's own code (``db.batch_state.apply_delta`` in ``Database.transact``,
on a fresh database migrated to head): one batch's request ends (each with tokens and a cost)
added to the batch's own row, as every end was before issue 11, against added to the share the
request's id picks (``batch_counters``), as every end is now.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path

import psycopg
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.batch_state import COUNTER_SHARDS, BatchDelta, apply_delta
from db.engine import Database
from db.migrate import upgrade
from db.models import Batch
from db.states import BatchStatus, RequestStatus
from db.tenants import create_api_key
from db.types import utcnow


def updates_per_second(url: str, table: str, rows: int, connections: int, seconds: float) -> float:
    counts = [0] * connections
    stop_at = time.monotonic() + seconds

    def work(index: int) -> None:
        with psycopg.connect(url) as conn:
            done = 0
            while time.monotonic() < stop_at:
                with conn.transaction():
                    conn.execute(f"UPDATE {table} SET n = n + 1 WHERE id = %s", (index % rows + 1,))
                done += 1
            counts[index] = done

    threads = [threading.Thread(target=work, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds


def _count_end(session: Session, *, batch_id: str, delta: BatchDelta, key: str | None) -> None:
    apply_delta(session, batch_id, delta, utcnow(), shard_key=key)


def _new_batch(url: str) -> str:
    db = Database(url, pool_size=1)
    tenant = create_api_key(db, "bench").tenant_id
    now, batch_id = utcnow(), f"batch_{uuid.uuid4().hex}"
    zero = {name: 0 for name in BatchDelta().__dataclass_fields__}
    batch = Batch(
        id=batch_id,
        tenant_id=tenant,
        status=BatchStatus.IN_PROGRESS,
        priority="default",
        created_at=now,
        expires_at=now + timedelta(days=1),
        total_count=10**9,
        **zero,
    )
    db.transact(lambda session: session.add(batch))
    db.dispose()
    return batch_id


def _ledger_ends(url: str, batch_id: str, threads: int, stop_at: float, shares: bool) -> int:
    """One process's part: ``threads`` connections counting request ends until ``stop_at``."""
    db = Database(url, pool_size=threads)
    counts = [0] * threads

    def work(index: int) -> None:
        done = 0
        while time.time() < stop_at:
            delta = BatchDelta(input_tokens=120, output_tokens=30, cost_usd=Decimal("0.000042"))
            delta.ended(RequestStatus.SUCCEEDED)
            key = f"req_{uuid.uuid4().hex}" if shares else None
            db.transact(partial(_count_end, batch_id=batch_id, delta=delta, key=key))
            done += 1
        counts[index] = done

    running = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    db.dispose()
    return sum(counts)


def ledger_ends_per_second(url: str, processes: int, threads: int, seconds: float, *, shares: bool) -> float:
    """Request ends counted on one batch per second, each its own transaction, through the ledger
    from several processes (one process's GIL would be the ceiling before the row)."""
    batch_id = _new_batch(url)
    stop_at = time.time() + 2 + seconds  # the processes' start-up before it
    with ProcessPoolExecutor(processes) as pool:
        parts = [pool.submit(_ledger_ends, url, batch_id, threads, stop_at, shares) for _ in range(processes)]
        return sum(part.result() for part in parts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=4, help="for the ledger's part")
    args = parser.parse_args()
    table = f"hot_row_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0)")
        conn.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 64) g")
        try:
            print(f"{args.connections} connections, one transaction per update, {args.seconds:.0f} s each:")
            for rows in (1, 4, 16):
                rate = updates_per_second(args.database_url, table, rows, args.connections, args.seconds)
                print(f"  {rows:>2} row(s): {rate:,.0f} updates/s")
        finally:
            conn.execute(f"DROP TABLE {table}")
        database = f"hot_row_{uuid.uuid4().hex[:8]}"
        conn.execute(f"CREATE DATABASE {database}")
    url = args.database_url.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0]
    try:
        upgrade(f"{url}/{database}")
        threads = max(1, args.connections // args.processes)
        print(f"{args.processes} processes x {threads} connections, request ends on one batch (ledger):")
        for shares in (False, True):
            target = f"{url}/{database}"
            rate = ledger_ends_per_second(target, args.processes, threads, args.seconds, shares=shares)
            where = f"its {COUNTER_SHARDS} shares" if shares else "the batch's row"
            print(f"  added to {where}: {rate:,.0f} ends/s")
    finally:
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {database} WITH (FORCE)")


if __name__ == "__main__":
    main()
