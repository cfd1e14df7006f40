"""What the pool costs before and between jobs: each process's CPU to start (until ready), and its
CPU while the pool has nothing to do (an empty queue, no request parked).

A user pays for the whole pool's CPU, start-up and waiting included: a worker waiting on an empty
queue or a rate limit should cost next to nothing.

    python bench/idle.py --workers 4 --concurrency 8 --idle-s 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import cpu_seconds, rss_mb
from headrace.stack import EmbeddedStack


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--idle-s", type=float, default=60.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="headrace-idle-") as home:
        stack = EmbeddedStack(Path(home), workers=args.workers, worker_concurrency=args.concurrency)
        started = time.monotonic()
        try:
            stack.start()
            ready_s = time.monotonic() - started
            time.sleep(2)  # the workers' first housekeeping rounds
            processes = [p for p in stack.processes if p.alive()]
            at_start = {p.name: cpu_seconds(p.pid) for p in processes}
            time.sleep(args.idle_s)
            idle = {p.name: cpu_seconds(p.pid) - at_start[p.name] for p in processes}
            rss = {p.name: rss_mb(p.pid) for p in processes}
        finally:
            stack.stop()
    per_minute = 60 / args.idle_s
    print(f"stack ready in {ready_s:.1f} s ({args.workers} workers x {args.concurrency} threads)")
    print("| process | CPU to start | CPU per idle minute | RSS |")
    print("|---|---|---|---|")
    for name, start_s in at_start.items():
        print(f"| {name} | {start_s:.2f} s | {idle[name] * per_minute:.2f} s | {rss[name]:.0f} MB |")
    print(
        f"| all | {sum(at_start.values()):.2f} s | {sum(idle.values()) * per_minute:.2f} s "
        f"| {sum(rss.values()):.0f} MB |"
    )


if __name__ == "__main__":
    main()
