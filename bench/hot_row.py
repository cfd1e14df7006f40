"""How many counter updates per second PostgreSQL commits on one row, against the same number
spread over several rows: the ceiling of one batch's counters, which every request's last ledger
transaction updates (``db/batch_state.py``: one atomic UPDATE, last, so the row lock is held only
until the commit).

A row lock is held until its transaction's commit has reached the WAL on disk, so updates of one
row go one at a time, each waiting for the previous one's flush; spread over rows they share the
flushes (group commit).

    python bench/hot_row.py --database-url postgresql://postgres@127.0.0.1:5432/postgres --connections 16
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid

import psycopg


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
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


if __name__ == "__main__":
    main()
