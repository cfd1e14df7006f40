"""bench/router_compare.py's LiteLLM side: the driver processes (bench/litellm_driver.py), each a
LiteLLM Router, in a venv of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds
from bench.router_common import CpuTimeline, Job, Result, provider_counts, reaped_cpu
from headrace.embedded import start_redis
from headrace.simulator.server import running_simulator

LITELLM_VERSION = "1.110.2"
LITELLM_VENV = Path.home() / ".cache" / "headrace-bench" / "litellm-venv"
DRIVER = Path(__file__).resolve().parent / "litellm_driver.py"

# ---------------------------------------------------------------------------------------- LiteLLM


def litellm_python(given: str | None) -> str:
    """The interpreter that runs the driver: --litellm-python, else the cached venv (made once)."""
    if given:
        return given
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        LITELLM_VENV.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    installed = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if installed != LITELLM_VERSION:
        print(f"installing litellm=={LITELLM_VERSION} into {LITELLM_VENV}", file=sys.stderr, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"litellm=={LITELLM_VERSION}", "redis"], check=True
        )
    return str(python)


@contextmanager
def drivers(argvs: list[list[str]], logs: Path) -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        for i, argv in enumerate(argvs):
            with (logs / f"litellm-{i + 1}.log").open("w") as log:
                procs.append(
                    subprocess.Popen(
                        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
                    )
                )
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def read_message(proc: subprocess.Popen[str], key: str) -> dict[str, Any]:
    assert proc.stdout is not None
    for raw in proc.stdout:
        if raw.startswith("{"):
            message: dict[str, Any] = json.loads(raw)
            if message.get(key):
                return message
    raise RuntimeError(f"litellm driver {proc.pid} exited with {proc.wait()} before saying {key!r}")


def run_litellm(
    job: Job,
    processes: int,
    concurrency: int,
    python: str,
    num_retries: int,
    step_s: float,
    phase: int | None = None,
) -> Result:
    """``phase``: start the job at this second of the UTC minute (the strategy counts usage per UTC
    minute); the wait for it, every process ready and idle, is left out of the wall time."""
    processes = min(processes, len(job.lines))
    name = job.name if phase is None else f"{job.name}, go at :{phase:02d}"
    result = Result(f"LiteLLM Router, {processes} process(es) x {concurrency}", name, len(job.lines))
    waited = 0.0
    with tempfile.TemporaryDirectory(prefix="litellm-compare-") as home:
        requests = Path(home) / "requests.jsonl"
        requests.write_text("".join(json.dumps(line) + "\n" for line in job.lines))
        started = time.monotonic()
        with running_simulator(job.sim) as sim_url:
            redis_proc, redis_url = start_redis(Path(home) / "redis")
            try:
                port = redis_url.rsplit(":", 1)[1].split("/")[0]
                argvs = [
                    [
                        *(python, str(DRIVER), "--requests", str(requests), "--index", str(i)),
                        *("--count", str(processes), "--api-base", f"{sim_url}/v1", "--redis-port", port),
                        *("--rpm", str(job.rpm), "--tpm", str(job.tpm), "--concurrency", str(concurrency)),
                        *("--num-retries", str(num_retries)),
                    ]
                    for i in range(processes)
                ]
                with drivers(argvs, Path(home)) as procs:
                    ready = [read_message(proc, "ready") for proc in procs]
                    result.note = f"LiteLLM {ready[0]['version']}"
                    names = [f"litellm-{i + 1}" for i in range(processes)]
                    result.startup = {
                        name: cpu_seconds(proc.pid) for name, proc in zip(names, procs, strict=True)
                    }
                    if phase is not None:
                        now = datetime.now(UTC)
                        waited = (phase - now.second - now.microsecond / 1e6) % 60
                        time.sleep(waited)
                    result.startup["redis-server"] = cpu_seconds(redis_proc.pid)
                    job_started = time.monotonic()
                    second = datetime.now(UTC).second
                    with CpuTimeline([*(p.pid for p in procs), redis_proc.pid]) as timeline:
                        for proc in procs:
                            assert proc.stdin is not None
                            proc.stdin.write("go\n")
                            proc.stdin.close()
                        done = []
                        for name, proc in zip(names, procs, strict=True):
                            done.append(read_message(proc, "done"))
                            result.in_job[name] = done[-1]["job_cpu_s"]
                        result.job_s = time.monotonic() - job_started
                    result.in_job["redis-server"] = (
                        cpu_seconds(redis_proc.pid) - result.startup["redis-server"]
                    )
                    for name, proc in zip(names, procs, strict=True):
                        assert proc.stdout is not None
                        proc.stdout.close()
                        _, status, usage = os.wait4(proc.pid, 0)
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        result.total[name] = usage.ru_utime + usage.ru_stime
                result.ok = sum(d["ok"] for d in done)
                errors: dict[str, int] = {}
                for d in done:
                    for kind, n in d["errors"].items():
                        errors[kind] = errors.get(kind, 0) + n
                result.note += f", job started at second {second} of the UTC minute"
                if errors:
                    result.note += f", lost: {errors}"
                result.calls, result.refused, records = provider_counts(sim_url)
                result.timeline = timeline.per_step(step_s, records)
            finally:
                result.total["redis-server"] = reaped_cpu(redis_proc.stop)
            result.wall_s = time.monotonic() - started - waited
    return result
