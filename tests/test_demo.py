"""`headrace demo`, the README's first command: it finishes with its table and leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from headrace.embedded import headrace_command


def _processes_of(home: Path) -> list[int]:
    """Live processes started for this demo home: they carry its config path in their environment,
    or (redis-server, which overwrites its environment with its process title) run in it."""
    marker = f"HEADRACE_CONFIG={home / 'headrace.toml'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split()[2]
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if (marker in environ.split(b"\0") or cwd.startswith(str(home))) and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_demo_runs_a_batch_prints_its_bill_and_stops_everything(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    done = subprocess.run(
        headrace_command("demo", "--requests", "40", "--home", str(home)),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Per route" in out and "Per deployment" in out
    assert re.search(r"fast\s+│\s+16\s+│\s+0\s+│", out) and re.search(r"smart\s+│\s+24\s+│\s+0\s+│", out), out
    assert "openai-mini" in out and "claude-sonnet" in out and "cost USD" in out
    assert _processes_of(home) == []


@pytest.mark.slow
def test_demo_keep_running_serves_until_ctrl_c(tmp_path: Path) -> None:
    """--keep-running prints the URLs and a working key; Ctrl-C stops every process it started."""
    home = tmp_path / "demo"
    proc = subprocess.Popen(
        headrace_command("demo", "--requests", "10", "--keep-running", "--home", str(home)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    output = []
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            output.append(line)
            if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
                break
        text = "".join(output)
        key = re.search(r"API key: (hr_\S+)", text)
        api = re.search(r"API docs: (http://127\.0\.0\.1:\d+)/docs", text)
        flower = re.search(r"Flower: (http://127\.0\.0\.1:\d+)", text)
        assert key and api and flower, text
        listed = httpx.get(f"{api.group(1)}/v1/batches", headers={"Authorization": f"Bearer {key.group(1)}"})
        assert listed.status_code == 200 and len(listed.json()["data"]) == 2
        assert httpx.get(f"{flower.group(1)}/healthcheck").status_code == 200
        assert len(_processes_of(home)) == 5  # redis, simulator, api, worker, flower
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 130
    assert _processes_of(home) == []
