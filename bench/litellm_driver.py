"""One LiteLLM Router instance running its share of a JSONL workload: the other side of
bench/router_compare.py.

Run by a separate interpreter that has LiteLLM installed (LiteLLM is no dependency of Headrace);
it never imports headrace. Each process takes the lines ``index::count`` of --requests, builds a
``litellm.Router`` whose one deployment carries the provider's rpm/tpm, with the usage-based-routing-v2
strategy counting usage in a Redis every instance shares (``redis_host`` / ``redis_port``), and sends its
lines through ``Router.acompletion`` with --concurrency in flight and --num-retries.

Protocol with the bench, one JSON object per stdout line: ``{"ready": ...}`` once imported and built,
then it waits for a line on stdin (so that every instance starts the job together), runs, and
prints ``{"done": ...}`` with its counts, its CPU seconds to start (interpreter, imports, Router) and in
the job, and the job's wall time.

    python bench/litellm_driver.py --requests r.jsonl --index 0 --count 2 \
        --api-base http://127.0.0.1:PORT/v1 --redis-port PORT --rpm 400 --tpm 165000 \
        --concurrency 16 --num-retries 100
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time
from collections import Counter
from typing import Any

# Nothing leaves loopback: no cost map, blog feed or other catalogue fetched from the internet.
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def run(router: Any, lines: list[dict[str, Any]], concurrency: int) -> tuple[int, Counter[str]]:
    gate = asyncio.Semaphore(concurrency)
    errors: Counter[str] = Counter()
    ok = 0

    async def one(body: dict[str, Any]) -> None:
        nonlocal ok
        async with gate:
            try:
                await router.acompletion(
                    model="bench", messages=body["messages"], max_tokens=body.get("max_tokens")
                )
                ok += 1
            except Exception as exc:  # every way a request is lost, by its type
                errors[type(exc).__name__] += 1

    await asyncio.gather(*(one(line["body"]) for line in lines))
    return ok, errors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", required=True, help="JSONL: {custom_id, body} per line")
    parser.add_argument("--index", type=int, default=0, help="this instance takes lines index::count")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--api-base", required=True, help="the OpenAI-compatible provider, .../v1")
    parser.add_argument("--model", default="openai/gpt-4o-mini")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, required=True)
    parser.add_argument("--rpm", type=int, required=True)
    parser.add_argument("--tpm", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-retries", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0, help="per call, s")
    args = parser.parse_args()

    litellm: Any = importlib.import_module("litellm")
    litellm.telemetry = False
    with open(args.requests) as handle:
        lines = [json.loads(raw) for raw in handle if raw.strip()][args.index :: args.count]
    router = litellm.Router(
        model_list=[
            {
                "model_name": "bench",
                "litellm_params": {
                    "model": args.model,
                    "api_base": args.api_base,
                    "api_key": "sk-litellm-bench",
                    "rpm": args.rpm,
                    "tpm": args.tpm,
                    "timeout": args.timeout,
                },
            }
        ],
        redis_host=args.redis_host,
        redis_port=args.redis_port,
        routing_strategy="usage-based-routing-v2",
        num_retries=args.num_retries,
        timeout=args.timeout,
    )
    version = importlib.import_module("importlib.metadata").version("litellm")
    # The process's CPU from its start (interpreter, imports, the Router), as the kernel counts it.
    emit(ready=True, version=version, requests=len(lines), startup_cpu_s=time.process_time())

    sys.stdin.readline()  # the bench's "go": every instance starts the job together
    cpu_before, started = time.process_time(), time.monotonic()
    ok, errors = asyncio.run(run(router, lines, args.concurrency))
    wall, cpu = time.monotonic() - started, time.process_time() - cpu_before
    emit(
        done=True,
        requests=len(lines),
        ok=ok,
        lost=len(lines) - ok,
        errors=dict(errors),
        job_cpu_s=cpu,
        job_wall_s=wall,
    )


if __name__ == "__main__":
    main()
