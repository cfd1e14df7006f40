"""A throwaway PostgreSQL cluster: initdb on a free port, torn down at the end.

initdb refuses to run as root, and CI runs as root: then initdb and pg_ctl run as the
``postgres`` user on a directory it owns. Without binaries, HEADRACE_TEST_POSTGRES_URL (a
server URL whose user may CREATE DATABASE) is used instead, and without that the tests skip.
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
from pathlib import Path

from headrace.embedded import free_port


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if Path(directory, "initdb").exists() and Path(directory, "pg_ctl").exists():
            return Path(directory)
    return Path(found).parent if found and Path(found).with_name("initdb").exists() else None


def _as_owner(argv: list[str], user: str | None) -> list[str]:
    if user is None:
        return argv
    return ["su", user, "-s", "/bin/sh", "-c", " ".join(f"'{a}'" for a in argv)]


@contextmanager
def running_postgres() -> Iterator[str | None]:
    """Yields a server URL (``postgresql+psycopg://postgres@127.0.0.1:PORT``), or None."""
    external = os.environ.get("HEADRACE_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    bin_dir = _bin_dir()
    if bin_dir is None:
        yield None
        return
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            yield None
            return
        user = "postgres"
    data = Path(tempfile.mkdtemp(prefix="headrace-pg-"))
    if user:
        shutil.chown(data, user)
    port = free_port()
    pg_ctl = str(bin_dir / "pg_ctl")
    subprocess.run(
        _as_owner(
            [str(bin_dir / "initdb"), "-D", str(data / "db"), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
            user,
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300"
    subprocess.run(
        _as_owner(
            [pg_ctl, "-D", str(data / "db"), "-o", options, "-l", str(data / "log"), "-w", "start"], user
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            _as_owner([pg_ctl, "-D", str(data / "db"), "-m", "immediate", "stop"], user), capture_output=True
        )
        shutil.rmtree(data, ignore_errors=True)
