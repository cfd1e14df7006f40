"""The ledger through PgBouncer in transaction mode: the pool in front of PostgreSQL that most
production deployments put there. A server connection serves one transaction and goes back to the
pool, so nothing may outlive a transaction: psycopg's server-side prepared statements would be
looked for on another connection (``HEADRACE_DATABASE_PREPARED_STATEMENTS=false`` turns them off).

A full stack (2 workers x 16 threads) runs 400 requests through it: each ends once, every call
is one costed attempt row, and PostgreSQL sees no more connections than PgBouncer's pool, however
many clients the workers open."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db.engine import Database
from headrace.stack import EmbeddedStack
from tests.infra.pgbouncer import POOL_SIZE, pgbouncer_binary, running_pgbouncer, server_connections
from tests.infra.postgres import PostgresCluster
from tests.test_end_to_end import lines, wait_ended
from tests.test_outages import _assert_each_call_once_and_costed, _results

REQUESTS = 400


@pytest.fixture(scope="module")
def bouncer(postgres_cluster: PostgresCluster | None) -> Iterator[tuple[PostgresCluster, str]]:
    if postgres_cluster is None or not postgres_cluster.restartable:
        pytest.skip("needs a PostgreSQL cluster of the suite's own")
    if pgbouncer_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("pgbouncer is missing: .ci/run installs Debian's package")
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    with running_pgbouncer(postgres_cluster) as url:
        yield postgres_cluster, url


def _fresh_database(cluster: PostgresCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    server = cluster.url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def test_prepared_statements_break_behind_pgbouncer_unless_turned_off(
    bouncer: tuple[PostgresCluster, str],
) -> None:
    """What the setting is for: two connections taking turns at a statement run often enough to
    be prepared (psycopg prepares on the fifth run) meet each other's prepared statements on
    PgBouncer's server connections with prepared statements on, and never with them off."""
    cluster, url = bouncer
    name = _fresh_database(cluster)

    query = text("SELECT count(*) FROM pg_class WHERE relpages >= :n")

    def take_turns(db: Database) -> list[str]:
        errors = []
        connections = [db.engine.connect() for _ in range(2)]
        try:
            for i in range(12):
                for connection in connections:
                    try:
                        connection.execute(query, {"n": i})
                        connection.commit()
                    except DBAPIError as exc:
                        errors.append(str(exc.orig))
                        connection.rollback()
        finally:
            for connection in connections:
                connection.close()
        return errors

    prepared = Database(f"{url}/{name}", pool_size=2, prepared_statements=True)
    unprepared = Database(f"{url}/{name}", pool_size=2, prepared_statements=False)
    try:
        assert any("prepared statement" in error for error in take_turns(prepared))
        assert take_turns(unprepared) == []
    finally:
        prepared.dispose()
        unprepared.dispose()


@pytest.fixture(scope="module")
def stack(
    bouncer: tuple[PostgresCluster, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    cluster, url = bouncer
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("pgbouncer"),
        database_url=f"{url}/{_fresh_database(cluster)}",
        workers=2,
        worker_concurrency=16,
        simulator_args=("--latency-ms", "40"),
        extra_env={"HEADRACE_DATABASE_PREPARED_STATEMENTS": "false"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.mark.slow
def test_a_run_through_pgbouncer_ends_every_request_once_on_a_bounded_pool(
    bouncer: tuple[PostgresCluster, str], stack: EmbeddedStack, http: httpx.Client
) -> None:
    cluster, _ = bouncer
    assert stack.database_url is not None
    name = stack.database_url.rsplit("/", 1)[1]
    batch = http.post("/v1/batches", json={"requests": lines(REQUESTS, "pb", ("fast",))}).json()["id"]
    most = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        most = max(most, server_connections(cluster, name))
        if http.get(f"/v1/batches/{batch}").json()["status"] in ("completed", "failed"):
            break
        time.sleep(0.2)
    view = wait_ended(http, [batch], timeout_s=60)[batch]
    results = _results(http, batch)
    assert view["status"] == "completed", view
    assert sorted(r["custom_id"] for r in results) == sorted(f"pb-{i}" for i in range(REQUESTS))
    assert all(r["status"] == "succeeded" for r in results)
    _assert_each_call_once_and_costed(stack, [batch])
    print(f"\nat most {most} PostgreSQL connections to the ledger (PgBouncer pool: {POOL_SIZE})")
    assert 0 < most <= POOL_SIZE
