"""Every Lua script Headrace runs in Redis is read here, from ``workers/lua``.

Redis has no script imports: a script that uses shared helpers is sent with their files in front
of it (``PRELUDE`` for the bucket's clock and arithmetic, ``BREAKER`` for the circuit breaker's
state machine on top of it). The files are read from the workers package's directory rather than
imported, because broker_config imports nothing above it and the API reads buckets too; they are
package data of ``workers`` (pyproject.toml), so the path holds in a checkout and in site-packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

LUA_DIR = Path(__file__).resolve().parent.parent / "workers" / "lua"

PRELUDE = ("prelude.lua",)
BREAKER = ("prelude.lua", "breaker.lua")
BUDGET = ("prelude.lua", "budget.lua")
BREAKER_AND_BUDGET = ("prelude.lua", "breaker.lua", "budget.lua")


@cache
def _read(name: str) -> str:
    return (LUA_DIR / name).read_text()


def lua_source(name: str, libraries: Sequence[str] = ()) -> str:
    """The script ``name`` with the ``libraries`` it uses in front of it, in order."""
    return "\n".join(_read(part) for part in (*libraries, name))
