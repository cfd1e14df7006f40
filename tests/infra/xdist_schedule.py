"""How the suite shares two cores under pytest-xdist: slow modules first, pace tests alone.

Slow modules are collected first (longest first is the classic way to keep one process from
running the last long module alone while the other has finished; alphabetical order put the
minute-long outage test last).

The suite runs as two xdist processes (README: ``-n 2``): most of its time is spent waiting on
stacks under outages, and two at once halve the wall time. A test marked ``exclusive`` measures
how fast the pool goes against a limiter (a span within 10% of the ideal), and a neighbour busy
on the other core makes that measure the machine instead (seen: a token bucket's span at x1.14
of the ideal with a neighbour, x1.05 alone). So every test holds a shared lock for its whole
protocol (fixtures set up and torn down with it included), and an exclusive test holds it alone.

A plain ``fcntl`` lock would starve the exclusive test (the other process takes the shared lock
again as soon as it lets go), so an exclusive test first leaves a file saying it wants the lock,
and shared takers wait while one is there. Without xdist there is nobody to share with: nothing
is taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MARKER = "exclusive: measures pace; runs with no other test beside it under pytest-xdist"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with a slow test first, each module's tests in their own order."""
    slow_modules = {getattr(item, "module", None) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: getattr(item, "module", None) not in slow_modules)


def _lock_dir(config: pytest.Config) -> Path | None:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return None  # not an xdist worker: the only test process
    path = Path(tempfile.gettempdir()) / f"headrace-tests-{workerinput['testrunuid']}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _held(directory: Path, worker: str, exclusive: bool) -> Iterator[None]:
    with (directory / "lock").open("a+") as handle:
        want = directory / f"want-{worker}"
        if exclusive:
            want.touch()
        else:
            while any(directory.glob("want-*")):
                time.sleep(0.2)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            want.unlink(missing_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    directory = _lock_dir(item.config)
    if directory is None:
        yield
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw")
    with _held(directory, worker, item.get_closest_marker("exclusive") is not None):
        yield
