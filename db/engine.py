"""Engines and sessions for the ledger, tuned per dialect.

SQLite (the embedded default) allows one writer at a time. A deferred transaction that reads and
then writes fails at once with "database is locked" when another writer committed in between, and
the busy timeout does not help it. So writes go through a second engine whose transactions start
with ``BEGIN IMMEDIATE`` (they wait for the lock up front), while reads keep plain deferred
transactions, so that a long results download never holds the write lock. On PostgreSQL both
roles share one engine.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
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

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.dialect = make_url(url).get_backend_name()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(url, immediate=False)
            self.write_engine = _sqlite_engine(url, immediate=True)
        else:
            self.engine = create_engine(
                url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800
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

    def transact(self, unit: Callable[[Session], T], *, attempts: int = 8) -> T:
        """Run ``unit`` in one write transaction, again from the top on a transient failure.

        Transient: a dropped connection (Postgres restarted) or SQLite's lock. Safe because
        every unit of work in Headrace is idempotent.
        """
        for attempt in range(1, attempts + 1):
            try:
                with self.write() as session:
                    return unit(session)
            except (OperationalError, DBAPIError) as exc:
                if attempt == attempts or not _is_transient(exc):
                    raise
                delay = min(0.05 * 2**attempt, 5.0) * (0.5 + random.random() / 2)
                log.warning("ledger write failed (%s); retrying in %.2fs", type(exc.orig).__name__, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()


def _is_transient(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    message = str(exc.orig).lower()
    transient = ("database is locked", "connection", "server closed", "terminating", "deadlock")
    return any(word in message for word in transient)


@lru_cache(maxsize=8)
def get_database(url: str) -> Database:
    """One Database per URL per process (engines are thread-safe; sessions are not)."""
    return Database(url)
