"""PgBouncer in transaction mode in front of the suite's PostgreSQL cluster (Debian's
``pgbouncer``, installed by ``.ci/run``). Like PostgreSQL it refuses to run as root: as root it
runs as the ``postgres`` user, in a directory that user owns."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import psycopg

from headrace.embedded import ManagedProcess, free_port
from tests.infra.postgres import PostgresCluster

POOL_SIZE = 20  # server connections per database and user: what PostgreSQL really sees


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if Path(path).exists()), None
    )


@contextmanager
def running_pgbouncer(cluster: PostgresCluster) -> Iterator[str]:
    """PgBouncer on a free port, pooling by transaction; yields the server URL to use instead of
    the cluster's (``postgresql+psycopg://postgres@127.0.0.1:PORT``, no database)."""
    binary = pgbouncer_binary()
    assert binary is not None
    server = urlparse(cluster.url.replace("postgresql+psycopg", "postgresql"))
    home = Path(tempfile.mkdtemp(prefix="headrace-pgbouncer-"))
    port = free_port()
    (home / "userlist.txt").write_text(f'"{server.username}" ""\n')
    (home / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname} port={server.port}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {home / 'userlist.txt'}\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {POOL_SIZE}\nmax_client_conn = 1000\n"
        # What psycopg sends at start-up that PgBouncer would refuse otherwise.
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"admin_users = {server.username}\n"
    )
    argv = [binary, str(home / "pgbouncer.ini")]
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        for path in home.iterdir():
            shutil.chown(path, "postgres")
        argv = ["su", "postgres", "-s", "/bin/sh", "-c", "exec " + " ".join(f"'{a}'" for a in argv)]
    proc = ManagedProcess(f"pgbouncer-{port}", argv, log_dir=home)
    url = f"postgresql+psycopg://{server.username}@127.0.0.1:{port}"
    try:
        proc.wait_until(
            lambda: (
                psycopg.connect(
                    f"postgresql://{server.username}@127.0.0.1:{port}/postgres", connect_timeout=1
                ).close()
                is None
            ),
            timeout_s=15,
            what="accepting connections",
        )
        yield url
    finally:
        proc.stop()
        subprocess.run(["rm", "-rf", str(home)], check=False)


def server_connections(cluster: PostgresCluster, database: str) -> int:
    """Connections PostgreSQL itself holds to ``database`` (PgBouncer's, behind the pool)."""
    url = cluster.url.replace("postgresql+psycopg", "postgresql") + "/postgres"
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)).fetchone()
    return int(row[0]) if row else 0
