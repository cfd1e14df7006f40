"""Servers start once per session on free loopback ports; each test gets clean state."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis as redis_lib

from broker_config.logs import configure_structlog
from db.engine import Database
from db.migrate import upgrade
from headrace.embedded import start_redis
from headrace.stack import EmbeddedStack
from tests.infra.postgres import PostgresCluster, running_postgres

pytest_plugins = [
    "tests.simulator_fixture",  # the session's simulator: `sim`, `sim_url`
    "tests.infra.xdist_schedule",  # slow modules first; tests marked `exclusive` run alone
]

# As in every Headrace process, structlog hands our events to the standard library (caplog sees them).
configure_structlog()

PROVIDER_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
)


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees a real provider key or base URL from the machine it runs on."""
    for name in PROVIDER_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("HEADRACE_") and name != "HEADRACE_TEST_POSTGRES_URL":
            monkeypatch.delenv(name, raising=False)
        if name.startswith("OTEL_"):  # no stack a test starts exports traces unless it asks to
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


@pytest.fixture
def redis(redis_url: str) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster | None]:
    with running_postgres() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_server(postgres_cluster: PostgresCluster | None) -> str | None:
    """The server URL (no database), or None when no PostgreSQL is at hand."""
    return postgres_cluster.url if postgres_cluster else None


def _fresh_postgres_db(server: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(
        server.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True
    ) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


@pytest.fixture
def make_database_url(postgres_server: str | None, tmp_path: Path) -> Callable[[str], str]:
    """A new, migrated, empty ledger of the given dialect ("sqlite" or "postgresql")."""

    def make(dialect: str) -> str:
        if dialect == "sqlite":
            url = f"sqlite:///{tmp_path / f'ledger-{uuid.uuid4().hex[:6]}.db'}"
        else:
            if postgres_server is None:
                pytest.skip("no PostgreSQL binaries and no HEADRACE_TEST_POSTGRES_URL")
            url = _fresh_postgres_db(postgres_server)
        upgrade(url)
        return url

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, make_database_url: Callable[[str], str]) -> str:
    """Each database test runs on both dialects: SQLite embedded, PostgreSQL in production."""
    return make_database_url(request.param)


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def run_cli() -> Callable[..., str]:
    """Run ``headrace ARGS`` as a user would; returns stdout, fails the test with stderr on error."""
    import subprocess

    from headrace.embedded import headrace_command

    def run(
        *args: str, env: dict[str, str] | None = None, expect_code: int = 0, timeout_s: float = 120
    ) -> str:
        done = subprocess.run(
            headrace_command(*args),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, **(env or {})},
        )
        assert done.returncode == expect_code, (
            f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
        )
        return done.stdout if expect_code == 0 else done.stderr

    return run


@pytest.fixture
def http(stack: EmbeddedStack) -> Iterator[httpx.Client]:
    """An API client with the stack's key, for the module's ``stack`` fixture."""
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
    ) as client:
        yield client
