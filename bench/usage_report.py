"""How long a usage report takes on a big ledger (PostgreSQL).

    python bench/usage_report.py --database-url postgresql+psycopg://user@host/db --requests 1000000

Fills an empty, migrated ledger server-side (generate_series): one tenant, 1,000 batches, the
requests spread over the last 30 days with 20 features, 500 users and 3 routes, one call each
and a retried call for every fifth. Then times ``GET /v1/usage``'s query for the last 30 days
grouped by feature and route (``db.usage.usage_report``), and prints PostgreSQL's plan for its
one scan of the requests. Without --database-url: a throwaway PostgreSQL cluster (tests/infra/postgres.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db.engine import Database
from db.migrate import upgrade
from db.types import utcnow
from db.usage import UsageQuery, _scoped, usage_report
from db.usage_sql import requests_statement

FILL = [
    "INSERT INTO tenants (id, name, created_at) VALUES ('ten_bench', 'bench', now())",
    """INSERT INTO batches (id, tenant_id, status, priority, created_at, expires_at, total_count, api,
         succeeded_count, failed_count, cancelled_count, expired_count, input_tokens, output_tokens,
         cost_usd, unpriced_attempts)
       SELECT 'batch_' || b, 'ten_bench', 'completed', 'default', now(), now() + interval '1 day', 0,
              'native', 0, 0, 0, 0, 0, 0, 0, 0
       FROM generate_series(0, 999) AS b""",
    """INSERT INTO requests (id, batch_id, line_no, custom_id, model, body, priority, status,
         attempt_count, deliveries, input_tokens, output_tokens, cost_usd, overhead_cost_usd, created_at,
         deployment, tags)
       SELECT 'req_' || g, 'batch_' || (g % 1000), g, 'c' || g, (ARRAY['fast','smart','cheap'])[g % 3 + 1],
              '{}'::jsonb, 'default', CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
              1 + (g % 5 = 0)::int, 1, 200 + g % 400, 20 + g % 300,
              0.0001 * (1 + g % 7) + (g % 5 = 0)::int * 0.00002, (g % 5 = 0)::int * 0.00002,
              now() - (g % 43200) * interval '1 minute', 'dep-' || (g % 3),
              jsonb_build_object('feature', 'f' || (g % 20), 'user', 'u' || (g % 500))
       FROM generate_series(1, :n) AS g""",
    """INSERT INTO attempts (request_id, attempt_no, deployment, provider, model, started_at, outcome,
         input_tokens, output_tokens, cost_usd, cost_estimated, estimated_input_tokens)
       SELECT 'req_' || g, 1, 'dep-' || (g % 3), 'openai', 'm', now(), 'success',
              100 + g % 400, 20 + g % 300, 0.0001 * (1 + g % 7), false, 100
       FROM generate_series(1, :n) AS g""",
    """INSERT INTO attempts (request_id, attempt_no, deployment, provider, model, started_at, outcome,
         input_tokens, output_tokens, cost_usd, cost_estimated, estimated_input_tokens)
       SELECT 'req_' || g, 2, 'dep-' || (g % 3), 'openai', 'm', now(), 'retry', 100, 0, 0.00002, false, 100
       FROM generate_series(5, :n, 5) AS g""",
    "ANALYZE",
]


@contextlib.contextmanager
def ledger(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from tests.conftest import _fresh_postgres_db
    from tests.infra.postgres import running_postgres

    with running_postgres() as cluster:
        if cluster is None:
            raise SystemExit("no PostgreSQL binaries: pass --database-url")
        yield _fresh_postgres_db(cluster.url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=None, help="an empty PostgreSQL database")
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with ledger(args.database_url) as url:
        upgrade(url)
        db = Database(url)
        started = time.monotonic()
        with db.engine.begin() as connection:
            for statement in FILL:
                connection.execute(text(statement), {"n": args.requests})
        print(f"filled {args.requests:,} requests in {time.monotonic() - started:.0f} s")
        until = utcnow()
        query = UsageQuery(until - timedelta(days=30), until, ("feature", "route"))
        for _ in range(args.runs):
            started = time.monotonic()
            with db.session() as session:
                report = usage_report(session, query, ("feature", "user"))
            print(
                f"report: {len(report.groups)} groups, {report.total.requests:,} requests, "
                f"{report.total.attempts:,} calls in {time.monotonic() - started:.2f} s"
            )
        with db.engine.connect() as connection:
            # As the report runs them (db/usage_sql.py requests_pass).
            connection.execute(text("SET work_mem = '64MB'"))
            connection.execute(text("SET jit = off"))

            def scope(statement: Any) -> Any:
                return _scoped(statement, query, tenant_names=False)

            columns = query.group_by
            # Grouped by deployment, the calls are scanned too (attempts_statement); not here.
            for statement in (requests_statement(scope, columns),):
                compiled = statement.compile(db.engine, compile_kwargs={"literal_binds": True})
                plan = connection.execute(text(f"EXPLAIN ANALYZE {compiled}")).scalars().all()
                print("\n".join(plan))
        db.dispose()


if __name__ == "__main__":
    main()
