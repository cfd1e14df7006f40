"""Headless Chromium (Debian's ``chromium``, installed by ``.ci/run``), driven from its command line:
no driver, no browser download. Every host name but 127.0.0.1 fails to resolve, so a page that
needs the internet renders without it, visibly; and nothing the browser does reaches out."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

# Loopback only: a CDN (or any other host) is NOTFOUND, so the page must stand on its own.
OFFLINE = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"
_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root in a container, the sandbox cannot start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm is often 64 MB
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1400,1000",
    OFFLINE,
)


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(url: str, action: list[str], *, budget_ms: int, timeout_s: float) -> str:
    binary = chromium_binary()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="headrace-chromium-") as profile:
        # Virtual time stands still while the page fetches: the budget runs out after the page has
        # settled, however slow the machine; the timeout is only for a browser that hangs.
        argv = [binary, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
        # Its own process group: on a timeout the renderer and GPU processes go with the browser.
        proc = subprocess.Popen(
            [*argv, *action, url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=profile,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            raise AssertionError(f"chromium still running after {timeout_s} s on {url}") from None
        finally:
            # Helpers left behind (crashpad) go too. Linux reuses no pid that is still some
            # process's group id, so this group is ours or gone.
            _kill_group(proc.pid)
    assert proc.returncode == 0, f"chromium exit {proc.returncode}\n{err[-3000:]}"
    return out


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def dump_dom(url: str, *, budget_ms: int = 8000, timeout_s: float = 90) -> str:
    """The page's DOM, serialized once its scripts have run."""
    return _run(url, ["--dump-dom"], budget_ms=budget_ms, timeout_s=timeout_s)


def screenshot(url: str, path: Path, *, budget_ms: int = 8000, timeout_s: float = 90) -> Path:
    """A 1400x1000 PNG of the page once its scripts have run."""
    _run(url, [f"--screenshot={path}"], budget_ms=budget_ms, timeout_s=timeout_s)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    return path
