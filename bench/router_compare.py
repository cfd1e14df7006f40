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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds, redis_counters, wait_batch
from bench.rate_limits import CONFIG, sim_args
from bench.router_common import (
    MAX_TOKENS,
    UNLIMITED,
    CpuTimeline,
    Job,
    Result,
    ideal_of,
    provider_counts,
    reaped_cpu,
    workload,
)
from bench.router_litellm import litellm_python, run_litellm
from headrace.embedded import ManagedProcess, headrace_command
from headrace.simulator.config import SimConfig
from headrace.stack import EmbeddedStack

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
