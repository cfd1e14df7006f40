"""Accepting and downloading one large batch: 50,000 lines by default, through the native API
(streamed JSONL) and through the OpenAI-compatible one (file upload, then batches.create).

    python bench/large_batch.py --lines 50000

No worker runs, so the figures are the API's alone: wall time to the 201 (the batch and every
request committed), to every request published (done after the answer for large batches), the
API process's peak memory (VmHWM), and the time to stream the results file back.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_config.queues import broker_lists
from headrace.stack import EmbeddedStack


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def jsonl(n: int, openai_format: bool) -> bytes:
    out = io.BytesIO()
    for i in range(n):
        line = {
            "custom_id": f"r{i}",
            "body": {
                "model": "fast",
                "max_tokens": 64,
                "messages": [
                    {
                        "role": "user",
                        "content": f"Summarise item {i}: the mill race feeds the wheel at a steady rate.",
                    }
                ],
            },
        }
        if openai_format:
            line = {**line, "method": "POST", "url": "/v1/chat/completions"}
        out.write(json.dumps(line).encode() + b"\n")
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    args = parser.parse_args()
    native_body, openai_body = jsonl(args.lines, False), jsonl(args.lines, True)
    with tempfile.TemporaryDirectory(prefix="headrace-bench-") as home:
        stack = EmbeddedStack(Path(home), database_url=args.database_url, workers=0)
        try:
            stack.start()
            api_pid = next(p.pid for p in stack.processes if p.name == "api")
            headers = {"Authorization": f"Bearer {stack.api_key}"}
            with httpx.Client(base_url=stack.api_url, headers=headers, timeout=600) as http:
                started = time.monotonic()
                batch = (
                    http.post(
                        "/v1/batches", content=native_body, headers={"Content-Type": "application/jsonl"}
                    )
                    .raise_for_status()
                    .json()
                )
                native_s = time.monotonic() - started
                queued = redis.Redis.from_url(stack.env["HEADRACE_REDIS_URL"])
                while sum(queued.llen(key) for key in broker_lists()) < args.lines:  # published after the 201
                    time.sleep(0.2)
                published_s = time.monotonic() - started
                started = time.monotonic()
                with http.stream("GET", f"/v1/batches/{batch['id']}/results") as response:
                    size = sum(len(chunk) for chunk in response.iter_bytes())
                download_s = time.monotonic() - started
            client = openai.OpenAI(base_url=f"{stack.api_url}/openai/v1", api_key=stack.api_key, timeout=600)
            started = time.monotonic()
            upload = client.files.create(file=("big.jsonl", io.BytesIO(openai_body)), purpose="batch")
            created = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            openai_s = time.monotonic() - started
            peak = peak_rss_mb(api_pid)
        finally:
            stack.stop()
    assert created.request_counts and created.request_counts.total == args.lines
    print(
        "| ledger | lines | native JSONL accepted (201) | all published | OpenAI upload + create "
        "| results download | API peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {'PostgreSQL' if args.database_url else 'SQLite'} "
        f"| {args.lines:,} ({len(native_body) / 1e6:.1f} MB) "
        f"| {native_s:.1f} s | {published_s:.1f} s | {openai_s:.1f} s "
        f"| {download_s:.1f} s ({size / 1e6:.1f} MB) | {peak:.0f} MB |"
    )


if __name__ == "__main__":
    main()
