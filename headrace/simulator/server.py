"""Running the simulator: in this process (serve) or as a subprocess for tests (running_simulator)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import uvicorn

from headrace.simulator.app import create_app
from headrace.simulator.config import SimConfig

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
_PORT_ATTEMPTS = 3


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 9100) -> None:
    """Serve the simulator until interrupted (blocking)."""
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="info",
        access_log=False,
        backlog=4096,
        # Hanging calls would otherwise hold shutdown for hang_s.
        timeout_graceful_shutdown=1,
    )


@contextmanager
def running_simulator(config: SimConfig) -> Iterator[str]:
    """Run `python -m headrace.simulator` on a free loopback port; yield its base URL."""
    for attempt in range(_PORT_ATTEMPTS):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with tempfile.TemporaryFile() as log:
            process = _start(config, port, log)
            try:
                if not _wait_until_up(process, url):
                    if attempt + 1 < _PORT_ATTEMPTS and process.poll() is not None:
                        continue  # most likely another process took the port first
                    raise RuntimeError(f"simulator did not start on {url}:\n{_tail(log)}")
                yield url
                return
            finally:
                _stop(process)
    raise RuntimeError("simulator did not start")


def _start(config: SimConfig, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "headrace.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--config-json",
        config.model_dump_json(),
    ]
    env = dict(os.environ)
    # Importable even when the package is not installed into this interpreter.
    project_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, env.get("PYTHONPATH")) if p)
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _wait_until_up(process: subprocess.Popen[bytes], url: str) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(trust_env=False, timeout=1.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if client.get(f"{url}/_sim/health").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(log: IO[bytes], limit: int = 4000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]
