"""Pytest fixtures for the provider simulator: one subprocess per session, clean state per test.

Use from a test module (or a conftest) with
    from tests.simulator_fixture import sim, sim_url  # noqa: F401
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from headrace.simulator.config import SimConfig
from headrace.simulator.server import running_simulator

# Fast by default; tests that care about latency set it themselves.
BASELINE = SimConfig(latency_ms=1.0)

_ENV_PREFIXES = ("OPENAI_", "ANTHROPIC_")
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class SimControl:
    """The /_sim control plane of a running simulator."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=10.0)

    def configure(self, **patch: Any) -> dict[str, Any]:
        response = self.http.post("/_sim/config", json=patch)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset(self) -> None:
        self.http.post("/_sim/reset").raise_for_status()

    def stats(self, records: int | None = None) -> dict[str, Any]:
        params = {} if records is None else {"records": records}
        response = self.http.get("/_sim/stats", params=params)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


@pytest.fixture(scope="session")
def sim_url() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        # SDKs read these; a stray proxy or base URL must not send test traffic off the machine.
        for name in list(os.environ):
            if name.startswith(_ENV_PREFIXES) or name in _PROXY_VARS:
                env.delenv(name)
        with running_simulator(BASELINE) as url:
            yield url


@pytest.fixture
def sim(sim_url: str) -> Iterator[SimControl]:
    control = SimControl(sim_url)
    control.configure(**BASELINE.model_dump(mode="json"))
    control.reset()
    yield control
    control.http.close()
