"""Headrace beside the LiteLLM Router (sharing its limits through Redis), on the same simulator.

What a user pays for machines is the whole pool's CPU for a job, start-up and waiting included. Each
run here starts its side from nothing, runs one job, stops everything, and sums the user + system
CPU of every process that side needs, from start to stop:

  Headrace  ``headrace migrate`` and ``headrace keys create`` (processes of their own, as a user runs
            them), then the embedded stack (headrace/stack.py): its redis-server, the API and N worker
            processes; each stopped after the job, its teardown counted.
  LiteLLM   a redis-server started as the stack starts its own (headrace/embedded.py), then P processes
            of bench/litellm_driver.py, each a ``litellm.Router`` (one deployment with the provider's
            rpm/tpm, routing_strategy "usage-based-routing-v2", redis_host/redis_port: the strategy
            LiteLLM documents for counting usage across instances in Redis) sending its share of the
            requests through ``Router.acompletion`` with concurrency 16 and num_retries; interpreter
            start-up and imports counted. LiteLLM is no dependency of Headrace: the driver runs under
            --litellm-python (default: a venv made once under ~/.cache/headrace-bench with a pinned
            LiteLLM and redis from PyPI).

The simulator is the provider: its CPU is counted on neither side, and both sides' wall times include
starting it (the embedded stack starts its own first; the LiteLLM side starts one the same way). The
Headrace client (POST the batch, poll it every --poll-s, 0.5 s as ``headrace submit --wait`` does,
download the results) is this process; its CPU is shown apart, not in the total, and the API's
answers to its polls are in the API's CPU. Each process's CPU is read from /proc when its side is
ready and when the job ends, and taken from the kernel's account when it is reaped (getrusage of
children / wait4). The job's time runs from the batch's POST to the poll that sees it end, and for
LiteLLM from the moment every instance is told to go to the last one's last answer.

LiteLLM's usage-based-routing-v2 counts a deployment's usage per calendar minute (UTC), so how it
meets a provider's limit depends on when in the minute the job starts: the rate-limited part runs it
once per second listed in --litellm-phases (0, 20, 40), waiting for that second with every instance
ready (the wait, idle, is left out of the wall time).

Jobs (--parts):
  rate-limited  --requests (600) seeded requests, prompts of 20 to 620 words, max_tokens 256 (every
                answer runs to it, so a call uses what it reserved), against a token bucket of --rpm
                (400) and --tpm (165,000) refilling in 60 s, latency --latency-ms (50) +/- half: the
                ideal span of this workload under that limit is printed (about 90 s); Headrace with
                4 x 8 and 2 x 16 worker threads, LiteLLM 2 processes x 16 (32 in flight on each side)
  single        one request, same provider; Headrace 4 x 8 and 2 x 16, LiteLLM 1 process
  throughput    --throughput-requests (2,000), no limit at the provider (far above at both sides'
                deployments), latency 0: Headrace 2 x 16 (as bench/pipeline.py), LiteLLM 2 x 16

    python bench/router_compare.py                                  # all three parts, one sitting
    python bench/router_compare.py --parts single --runs headrace-4,litellm
    python bench/router_compare.py --litellm-python /path/to/venv/bin/python

Prints a Markdown table (one row per run), then where each run's CPU went, per process: until the
side was ready, during the job, and after it (teardown); then, for the rate-limited job, the side's
CPU per --timeline-s (10 s) beside the calls the provider admitted and refused in those seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds, redis_counters, wait_batch
from bench.rate_limits import CONFIG, VOCABULARY, sim_args
from headrace.embedded import ManagedProcess, headrace_command, start_redis
from headrace.simulator.buckets import Rules
from headrace.simulator.config import SimConfig
from headrace.simulator.ideal import ideal_span
from headrace.simulator.server import running_simulator
from headrace.simulator.tokens import count_prompt_tokens
from headrace.stack import EmbeddedStack

LITELLM_VERSION = "1.110.2"
LITELLM_VENV = Path.home() / ".cache" / "headrace-bench" / "litellm-venv"
DRIVER = Path(__file__).resolve().parent / "litellm_driver.py"
UNLIMITED = 1_000_000_000  # a deployment's rpm / tpm far above anything a run reaches
MAX_TOKENS = 256


@dataclass
class Job:
    name: str
    lines: list[dict[str, Any]]
    sim: SimConfig
    rpm: int
    tpm: int


@dataclass
class Result:
    side: str
    job: str
    requests: int
    wall_s: float = 0.0  # from the first process started to the last one stopped
    job_s: float = 0.0
    ok: int = 0
    calls: int = 0
    refused: int = 0  # 429s the provider answered
    startup: dict[str, float] = field(default_factory=dict)  # per process: CPU when its side was ready
    in_job: dict[str, float] = field(default_factory=dict)  # per process: CPU from ready to the job's end
    total: dict[str, float] = field(default_factory=dict)  # per process: CPU from start to exit
    client_cpu_s: float = 0.0
    note: str = ""
    # Per --timeline-s of the job: the side's CPU, and the provider's admitted and refused calls.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def cpu_total(self) -> float:
        return sum(self.total.values())

    @property
    def cpu_job(self) -> float:
        return sum(self.in_job.values())


def workload(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        text = " ".join(rng.choices(VOCABULARY, k=rng.randint(20, 620)))
        body = {"model": "bench", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def ideal_of(job: Job) -> float:
    costs = [
        {"requests": 1, "tokens": count_prompt_tokens(line["body"]["messages"]) + MAX_TOKENS}
        for line in job.lines
    ]
    return ideal_span(costs, {"requests": job.rpm, "tokens": job.tpm}, Rules(job.sim.limiter, 60.0, None))


def children_cpu() -> float:
    """User + system CPU of every child this process has reaped so far (and of what they reaped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reaped_cpu(stop: Callable[[], object]) -> float:
    """The CPU of the one child that ``stop`` stops and reaps: its whole life, teardown included."""
    before = children_cpu()
    stop()
    return children_cpu() - before


def provider_counts(url: str) -> tuple[int, int, list[dict[str, Any]]]:
    """The provider's calls, its 429s, and its call records."""
    stats = httpx.get(f"{url}/_sim/stats", params={"records": 20_000}, timeout=60).json()
    received = stats["received"].get("openai", 0)
    return received, stats["answered"].get("openai", {}).get("429", 0), stats["records"]


class CpuTimeline(threading.Thread):
    """Samples the summed CPU of some processes every second while the job runs."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, float]] = []  # (epoch s, CPU-s)
        self._finished = threading.Event()

    def read(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
        return total

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), self.read()))
            if self._finished.wait(1.0):
                self.samples.append((time.time(), self.read()))
                return

    def __enter__(self) -> CpuTimeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished.set()
        self.join(10)

    def per_step(self, step_s: float, records: list[dict[str, Any]]) -> list[tuple[float, int, int]]:
        """Per ``step_s`` from the first sample: CPU-s used, calls admitted, calls refused (429)."""
        if len(self.samples) < 2:
            return []
        t0, end = self.samples[0][0], self.samples[-1][0]
        steps = []
        start = t0
        while start < end - 1e-6:
            stop = min(start + step_s, end)
            cpu = self._at(stop) - self._at(start)
            inside = [r for r in records if start <= r["t"] < stop]
            steps.append((cpu, sum(r["admitted"] for r in inside), sum(r["status"] == 429 for r in inside)))
            start = stop
        return steps

    def _at(self, t: float) -> float:
        """CPU-s at ``t``, linear between the samples around it."""
        for (t1, c1), (t2, c2) in itertools.pairwise(self.samples):
            if t1 <= t <= t2:
                return c1 + (c2 - c1) * ((t - t1) / (t2 - t1) if t2 > t1 else 0.0)
        return self.samples[-1][1]


# --------------------------------------------------------------------------------------- Headrace


def run_headrace(job: Job, workers: int, threads: int, poll_s: float, step_s: float) -> Result:
    result = Result(f"Headrace, API + {workers} workers x {threads}", job.name, len(job.lines))
    with tempfile.TemporaryDirectory(prefix="headrace-compare-") as home:
        database_url = f"sqlite:///{home}/headrace.db"
        env = {
            **os.environ,
            "HEADRACE_DATABASE_URL": database_url,
            "HEADRACE_CONFIG": f"{home}/headrace.toml",
        }
        stack = EmbeddedStack(
            Path(home),
            database_url=database_url,
            config_template=CONFIG.format(rpm=job.rpm, tpm=job.tpm),
            workers=workers,
            worker_concurrency=threads,
            simulator_args=sim_args(job.sim),
        )
        started = time.monotonic()
        try:
            # As a user runs them: one process each, before the services (the stack's own in-process
            # upgrade then finds the schema current; the key it makes is not used).
            migrate = ["migrate"]
            result.total["migrate"] = reaped_cpu(
                lambda: subprocess.run(headrace_command(*migrate), env=env, check=True, capture_output=True)
            )
            key = ""

            def create_key() -> None:
                nonlocal key
                done = subprocess.run(
                    headrace_command("keys", "create", "--tenant", "bench"),
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                key = done.stdout.strip()

            result.total["keys create"] = reaped_cpu(create_key)
            stack.start()
            services = [p for p in stack.processes if p.name != "simulator"]
            result.startup = {"migrate": result.total["migrate"], "keys create": result.total["keys create"]}
            result.startup |= {_name(p): cpu_seconds(p.pid) for p in services}
            client_before = time.process_time()
            redis_url = stack.env["HEADRACE_REDIS_URL"]
            commands_before = redis_counters(redis_url)[0]
            with (
                httpx.Client(
                    base_url=stack.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=600
                ) as http,
                CpuTimeline([p.pid for p in services]) as timeline,
            ):
                job_started = time.monotonic()
                body = {"requests": job.lines, "priority": "default"}
                batch = http.post("/v1/batches", json=body).raise_for_status().json()["id"]
                wait_batch(http, batch, timeout_s=1800, poll_s=poll_s)
                result.job_s = time.monotonic() - job_started
                result.in_job = {_name(p): cpu_seconds(p.pid) - result.startup[_name(p)] for p in services}
                result.in_job |= {"migrate": 0.0, "keys create": 0.0}
                commands_after = redis_counters(redis_url)[0]
                results = [json.loads(x) for x in http.get(f"/v1/batches/{batch}/results").iter_lines()]
            result.client_cpu_s = time.process_time() - client_before
            result.ok = sum(r["status"] == "succeeded" for r in results)
            result.calls, result.refused, records = provider_counts(stack.simulator_url)
            result.timeline = timeline.per_step(step_s, records)
            runs = sum(
                log.read_text(errors="replace").count("] received")
                for log in (Path(home) / "logs").glob("worker*.log")
            )
            commands = {c: n - commands_before.get(c, 0) for c, n in commands_after.items()}
            top = sorted(commands.items(), key=lambda item: -item[1])[:4]
            result.note = (
                f"{runs} task runs (Celery deliveries, re-runs after waiting included); Redis in the job: "
                f"{sum(commands.values()):,} commands (" + ", ".join(f"{c} {n:,}" for c, n in top) + ")"
            )
            # Newest first (workers before the broker they need); the simulator (the provider) last,
            # outside the wall time and the sums.
            for process in reversed(services):
                result.total[_name(process)] = reaped_cpu(process.stop)
                stack.processes.remove(process)
            result.wall_s = time.monotonic() - started
        finally:
            stack.stop()
    return result


def _name(process: ManagedProcess) -> str:
    return "redis-server" if process.name.startswith("redis-") else process.name


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


# ---------------------------------------------------------------------------------------- report


def row(r: Result) -> str:
    return (
        f"| {r.side} | {r.job} | {r.wall_s:.1f} | {r.job_s:.1f} | {r.cpu_total:.1f} | {r.cpu_job:.1f} "
        f"| {r.cpu_job / max(r.requests, 1) * 1000:.1f} | {r.requests / max(r.job_s, 1e-9):.1f} "
        f"| {r.calls} | {r.refused} | {r.requests - r.ok} |"
    )


def breakdown(r: Result) -> list[str]:
    lines = []
    for name, total in r.total.items():
        start, job = r.startup.get(name, 0.0), r.in_job.get(name, 0.0)
        lines.append(
            f"| {r.side} | {r.job} | {name} | {start:.2f} | {job:.2f} | {total - start - job:.2f} "
            f"| {total:.2f} |"
        )
    start, job = sum(r.startup.values()), r.cpu_job
    lines.append(
        f"| {r.side} | {r.job} | **all** | {start:.2f} | {job:.2f} | {r.cpu_total - start - job:.2f} "
        f"| {r.cpu_total:.2f} |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="rate-limited,single,throughput")
    parser.add_argument(
        "--runs",
        default="headrace-4,headrace-2,litellm",
        help="headrace-W (W workers sharing 32 threads), headrace-WxT, litellm; the throughput part runs "
        "headrace-2x16 if any headrace run is named, and litellm if named",
    )
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rpm", type=int, default=400)
    parser.add_argument("--tpm", type=int, default=165_000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--litellm-python", default=None, help="an interpreter with litellm and redis")
    parser.add_argument("--litellm-processes", type=int, default=2)
    parser.add_argument(
        "--litellm-phases",
        default="0,20,40",
        help="rate-limited part: run LiteLLM once per second of the UTC minute listed, the job starting then",
    )
    parser.add_argument(
        "--num-retries", type=int, default=100, help="the LiteLLM Router's: enough for every request to end"
    )
    parser.add_argument(
        "--poll-s", type=float, default=0.5, help="the Headrace client's polls (`headrace submit --wait`'s)"
    )
    parser.add_argument("--timeline-s", type=float, default=10.0, help="step of the rate-limited timelines")
    args = parser.parse_args()
    python = litellm_python(args.litellm_python) if "litellm" in args.runs else ""

    def limited(n: int) -> Job:
        sim = SimConfig(
            latency_ms=args.latency_ms,
            latency_jitter_ms=args.latency_ms / 2,
            rpm=args.rpm,
            tpm=args.tpm,
            limiter="token-bucket",
            window_s=60.0,
            min_output_tokens=MAX_TOKENS,
            max_output_tokens=MAX_TOKENS,
            seed=args.seed,
        )
        return Job("", workload(n, args.seed), sim, args.rpm, args.tpm)

    jobs: list[tuple[Job, list[str]]] = []
    for part in args.parts.split(","):
        if part == "rate-limited":
            job = limited(args.requests)
            job.name = f"{args.requests} requests, rate-limited"
            print(
                f"rate-limited: {args.requests} requests, token bucket {args.rpm} RPM / {args.tpm:,} TPM "
                f"(60 s to refill), latency {args.latency_ms:.0f} +/- {args.latency_ms / 2:.0f} ms: "
                f"ideal span {ideal_of(job):.1f} s",
                flush=True,
            )
            phases = [f"litellm@{int(p)}" for p in args.litellm_phases.split(",") if p]
            runs = [r for r in args.runs.split(",") if r != "litellm"]
            jobs.append((job, runs + (phases if "litellm" in args.runs.split(",") else [])))
        elif part == "single":
            job = limited(1)
            job.name = "1 request"
            jobs.append((job, args.runs.split(",")))
        elif part == "throughput":
            sim = SimConfig(
                latency_ms=0, min_output_tokens=MAX_TOKENS, max_output_tokens=MAX_TOKENS, seed=args.seed
            )
            job = Job(
                f"{args.throughput_requests} requests, latency 0, no limit",
                workload(args.throughput_requests, args.seed),
                sim,
                UNLIMITED,
                UNLIMITED,
            )
            runs = ["headrace-2x16"] if "headrace" in args.runs else []
            jobs.append((job, runs + (["litellm"] if "litellm" in args.runs else [])))
        else:
            parser.error(f"unknown part {part!r}")

    results: list[Result] = []
    header = (
        "| stack | job | wall s (start to stop) | job s | CPU-s total | CPU-s in the job "
        "| CPU ms/request (in the job) | req/s (job) | provider calls | 429s | lost |"
    )
    print(header + "\n" + "|---" * 11 + "|", flush=True)
    for job, runs in jobs:
        for run in runs:
            if run.startswith("litellm"):
                single = len(job.lines) == 1
                processes = 1 if single else args.litellm_processes
                _, _, at = run.partition("@")
                phase = int(at) if at else None
                result = run_litellm(job, processes, 16, python, args.num_retries, args.timeline_s, phase)
            else:
                # headrace-W: W workers sharing 32 threads; headrace-WxT: T threads each.
                workers_, _, threads_ = run.removeprefix("headrace-").partition("x")
                workers = int(workers_)
                threads = int(threads_) if threads_ else max(1, 32 // workers)
                result = run_headrace(job, workers, threads, args.poll_s, args.timeline_s)
            results.append(result)
            print(row(result), flush=True)
    print("\nWhere the CPU went (seconds, per process): until its side was ready, in the job, after it")
    print("| stack | job | process | to ready | in the job | after | total |\n|---|---|---|---|---|---|---|")
    for r in results:
        print("\n".join(breakdown(r)))
    print()
    for r in results:
        extra = (
            f"; client (this process): {r.client_cpu_s:.2f} CPU-s" if r.side.startswith("Headrace") else ""
        )
        print(f"- {r.side}, {r.job}: {r.note or 'ok'}{extra}")
    timelines = [r for r in results if "rate-limited" in r.job and r.timeline]
    if timelines:
        print(
            f"\nThe rate-limited job per {args.timeline_s:.0f} s: CPU-s of the side / calls admitted / 429s"
        )
        for r in timelines:
            steps = ", ".join(f"{cpu:.1f}/{admitted}/{refused}" for cpu, admitted, refused in r.timeline)
            print(f"- {r.side}: {steps}")


if __name__ == "__main__":
    main()
