"""A throwaway PostgreSQL cluster: initdb on a free port, torn down at the end.

initdb refuses to run as root, and CI runs as root: then initdb and pg_ctl run as the
``postgres`` user on a directory it owns. Without binaries, HEADRACE_TEST_POSTGRES_URL (a
server URL whose user may CREATE DATABASE) is used instead (it cannot be restarted), and without
that the tests that need PostgreSQL skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from headrace.embedded import free_port


def _bin_dir() -> Path | None:
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(directory, "initdb").exists() and Path(directory, "pg_ctl").exists():
            return Path(directory)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and Path(found).with_name("initdb").exists() else None


@dataclass
class PostgresCluster:
    url: str  # postgresql+psycopg://postgres@127.0.0.1:PORT (no database)
    data: Path | None = None
    pg_ctl: str = ""
    user: str | None = None
    options: str = ""  # the server options it was first started with, for a later start

    def _run(self, *args: str) -> None:
        argv = [self.pg_ctl, "-D", str(self.data / "db"), *args] if self.data else []
        if self.user:
            argv = ["su", self.user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]
        subprocess.run(argv, check=True, capture_output=True, timeout=120)

    @property
    def restartable(self) -> bool:
        return self.data is not None

    def stop(self) -> None:
        """A fast shutdown: open connections are cut, new ones refused until ``start``."""
        assert self.restartable, "an external PostgreSQL cannot be stopped by the tests"
        self._run("-m", "fast", "-w", "stop")

    def start(self) -> None:
        assert self.data is not None
        self._run("-o", self.options, "-l", str(self.data / "log"), "-w", "start")

    def restart(self) -> None:
        """A fast shutdown (open connections are cut) and a start on the same port."""
        assert self.restartable, "an external PostgreSQL cannot be restarted by the tests"
        assert self.data is not None
        # -l again: without it the restarted server would log into our pipe and hold it open.
        self._run("-m", "fast", "-l", str(self.data / "log"), "-w", "restart")


@contextmanager
def running_postgres() -> Iterator[PostgresCluster | None]:
    external = os.environ.get("HEADRACE_TEST_POSTGRES_URL")
    if external:
        yield PostgresCluster(url=external)
        return
    bin_dir = _bin_dir()
    user: str | None = None
    if bin_dir is not None and os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
            user = "postgres"
        except KeyError:
            bin_dir = None
    if bin_dir is None:
        yield None
        return
    data = Path(tempfile.mkdtemp(prefix="headrace-pg-"))
    if user:
        shutil.chown(data, user)
    port = free_port()
    cluster = PostgresCluster(
        url=f"postgresql+psycopg://postgres@127.0.0.1:{port}",
        data=data,
        pg_ctl=str(bin_dir / "pg_ctl"),
        user=user,
    )
    initdb = [str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
    if user:
        initdb = ["su", user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in initdb)]
    subprocess.run(initdb, check=True, capture_output=True)
    cluster.options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    cluster._run("-o", cluster.options, "-l", str(data / "log"), "-w", "start")
    try:
        yield cluster
    finally:
        cluster._run("-m", "immediate", "stop")
        shutil.rmtree(data, ignore_errors=True)
