"""Engines and sessions for the ledger, tuned per dialect.

SQLite (the embedded default) allows one writer at a time. A deferred transaction that reads and
then writes fails at once with "database is locked" when another writer committed in between, and
the busy timeout does not help it. So writes go through a second engine whose transactions start
with ``BEGIN IMMEDIATE`` (they wait for the lock up front), while reads keep plain deferred
transactions, so that a long results download never holds the write lock. On PostgreSQL both
roles share one engine.

PostgreSQL connections are a budget: ``pool_size`` held, ``POOL_OVERFLOW`` more at a peak, per
process (a worker sizes its pool to its threads that touch the ledger: ``workers/tasks.py``).
Behind PgBouncer in transaction mode a server connection serves one transaction and goes back to
its pool, so nothing may outlive a transaction: ``prepared_statements=False`` stops psycopg from
preparing statements it runs often (it would look for them on another connection).
"""

from __future__ import annotations

import copy
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import stamina
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from broker_config.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 5  # libpq waits forever by default; a dead host must not hang a thread
DEFAULT_HOLD_S = 10.0  # how long a write is retried through transient failures, unless told otherwise
DEFAULT_POOL_SIZE = 10
POOL_OVERFLOW = 2  # beyond the pool, at a peak: a thread that briefly needs a second connection

# SQLSTATE classes worth running a unit of work again for: 08 connection exception, 40 transaction
# rollback (serialization failure, deadlock), 53 insufficient resources (too many connections),
# 57P operator intervention (admin/crash shutdown, "the database system is starting up"), and
# 25006 read-only transaction, which is what a primary demoted by a failover answers.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P", "25006")
# SQLite's "database is locked" family, extended codes included (SQLITE_BUSY_SNAPSHOT is 517).
_SQLITE_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        hide_parameters=True,  # see the PostgreSQL engine's
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that BEGIN is ours to emit.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Database:
    """The ledger's connection: ``session()`` for reads, ``transact(fn)`` for writes."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        hold_s: float = DEFAULT_HOLD_S,
        prepared_statements: bool = True,
        pre_ping: bool = True,
    ) -> None:
        self.url = url
        self.hold_s = hold_s
        self.dialect = make_url(url).get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(url, immediate=False)
            self.write_engine = _sqlite_engine(url, immediate=True)
        else:
            connect_args: dict[str, Any] = {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
            if not prepared_statements:
                connect_args["prepare_threshold"] = None  # psycopg 3: never prepare on the server
            self.engine = create_engine(
                url,
                pool_pre_ping=pre_ping,
                pool_size=pool_size,
                max_overflow=POOL_OVERFLOW,
                pool_recycle=1800,
                connect_args=connect_args,
                # An error's text would quote the statement's values (request bodies: prompts), and
                # errors are logged.
                hide_parameters=True,
            )
            self.write_engine = self.engine
        self._reads = sessionmaker(self.engine, expire_on_commit=False)
        self._writes = sessionmaker(self.write_engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A read session; whatever it reads is one consistent snapshot."""
        with self._reads() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction, committed on exit (rolled back on error). Not retried."""
        with self._writes() as session, session.begin():
            yield session

    def transact(self, unit: Callable[[Session], T], *, hold_s: float | None = None) -> T:
        """Run ``unit`` in one write transaction, again from the top on a transient failure, for up
        to ``hold_s`` seconds (the database's own default when None); then the failure is raised.

        Transient: see ``is_transient``. Safe because every unit of work in Headrace is idempotent.
        A worker holding a provider's answer passes a long hold: the call was paid for, and only
        the ledger can make it count (a managed PostgreSQL failover takes 30 to 120 s).
        """
        hold_s = self.hold_s if hold_s is None else hold_s
        checks: list[Callable[[Database], object]] = []

        def run(session: Session) -> T:
            checks.clear()  # a unit that is run again registers its checks again
            result = unit(session)
            checks.extend(session.info.pop("after_commit", ()))
            return result

        if hold_s <= 0:
            with self.write() as session:
                result = run(session)
        else:
            result = self._retried(run, hold_s)
        for check in checks:
            # Asked for by the unit (e.g. db.batch_state: has the batch ended?); what it would have
            # done, a sweep does later, so its failure is only logged.
            try:
                check(self)
            except Exception:
                log.warning("a check after a commit failed; a sweep will do it", exc_info=True)
        return result

    def _retried(self, run: Callable[[Session], T], hold_s: float) -> T:
        for attempt in stamina.retry_context(
            on=is_transient,
            attempts=None,
            timeout=hold_s,
            wait_initial=0.05,
            wait_max=2.0,
            wait_jitter=0.25,
        ):
            with attempt, self.write() as session:
                return run(session)
        raise AssertionError("unreachable: stamina re-raises the last failure")

    def with_hold(self, hold_s: float) -> Database:
        """The same engines (one connection pool), with another default hold for its writes."""
        other = copy.copy(self)
        other.hold_s = hold_s
        return other

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()


def is_transient(exc: Exception) -> bool:
    """Would the same unit of work succeed if run again shortly? Decided from the driver's error
    codes (SQLSTATE on PostgreSQL, the result code on SQLite), never from message text."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, sqlite3.OperationalError):
        return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_BUSY_CODES
    if isinstance(orig, psycopg.Error):
        if orig.sqlstate is None:
            # No SQLSTATE: the client could not talk to a server at all (refused, reset, timed out).
            return isinstance(orig, psycopg.OperationalError)
        return orig.sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    return False


def settings_database(
    settings: Settings,
    *,
    hold_s: float = DEFAULT_HOLD_S,
    pool_size: int | None = None,
    pre_ping: bool = True,
) -> Database:
    """The ledger the settings name, with their pool budget and prepared-statement choice
    (``pool_size``: this process's own default when the settings give none). ``pre_ping``: test
    each pooled PostgreSQL connection with a round trip before lending it (off where every write
    goes through ``transact``, which starts again on a connection found dead)."""
    return get_database(
        settings.database_url,
        hold_s,
        pool_size=settings.database_pool_size or pool_size or DEFAULT_POOL_SIZE,
        prepared_statements=settings.database_prepared_statements,
        pre_ping=pre_ping,
    )


@lru_cache(maxsize=8)
def get_database(
    url: str,
    hold_s: float = DEFAULT_HOLD_S,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    prepared_statements: bool = True,
    pre_ping: bool = True,
) -> Database:
    """One Database per URL and options per process (engines are thread-safe; sessions are not)."""
    return Database(
        url, hold_s=hold_s, pool_size=pool_size, prepared_statements=prepared_statements, pre_ping=pre_ping
    )
