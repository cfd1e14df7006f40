"""What metrics, logs and traces cost a worker per request, each part alone, in one process.

    python bench/observability.py --requests 20000

``bench/pipeline.py --observability off|default|all`` measures the same end to end, but on a
shared 2-core machine its runs differ by more than the thing measured; this replays what one
successful request's run does to each part (the same functions, the same label sets, the same
log lines) and counts the CPU each costs:

- metrics: every ``workers.observe`` call of a run (admission wait, calls in flight, the GenAI
  histograms, the attempt, tokens and cost, the reservation, the request's end);
- logs: the ids bound and cleared through contextvars, and the two INFO lines Celery writes per
  task, rendered as JSON through the scrubber (to /dev/null);
- traces: the run's span and the call's span with their attributes, exported in batches over
  OTLP/HTTP to a local sink.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pipeline import otlp_sink
from broker_config.deployments import Deployment
from broker_config.settings import Settings
from workers.ledger import RunStart
from workers.providers.base import ProviderReply, Usage

DEPLOYMENT = Deployment(
    name="openai-mini", provider="openai", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1"
)
REPLY = ProviderReply(
    body={"id": "chatcmpl-1", "model": "gpt-4o-mini-2024-07-18", "choices": []},
    usage=Usage(42, 17),
    http_status=200,
)
RUN = RunStart(
    request_id="req_0123456789abcdef",
    batch_id="batch_0123456789abcdef",
    model="fast",
    body={},
    priority="default",
    expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    tenant="acme",
    created_at=datetime(2026, 1, 1, tzinfo=UTC),
    tags={"feature": "search"},
)


def metrics_of_one_request() -> None:
    from workers import observe

    observe.waited_for_room(DEPLOYMENT.name, 0.0004)
    observe.call_started(DEPLOYMENT.name)
    observe.call_ended(DEPLOYMENT.name)
    observe.call(DEPLOYMENT, REPLY, 0.052)
    observe.attempt(DEPLOYMENT.name, "success")
    observe.spent(
        [observe.Spent(RUN.tenant, "fast", DEPLOYMENT.name, RUN.tags, REPLY.usage, Decimal("0.0000165"))]
    )
    observe.reservation(DEPLOYMENT.name, 1066, REPLY.usage)
    observe.request_ended("fast", RUN.priority, "succeeded")


def logs_of_one_request() -> None:
    import structlog

    structlog.contextvars.bind_contextvars(request_id=RUN.request_id)
    structlog.contextvars.bind_contextvars(batch_id=RUN.batch_id, tenant=RUN.tenant)
    structlog.contextvars.bind_contextvars(deployment=DEPLOYMENT.name, attempt=1)
    structlog.contextvars.unbind_contextvars("deployment", "attempt")
    # What Celery writes for every task at INFO (celery.worker.strategy, celery.app.trace).
    logging.getLogger("celery.worker.strategy").info("Task %s[%s] received", "headrace.run_request", "3f2a")
    logging.getLogger("celery.app.trace").info(
        "Task %s[%s] succeeded in %ss: %r", "headrace.run_request", "3f2a", 0.061, None
    )
    structlog.contextvars.clear_contextvars()


def traces_of_one_request() -> None:
    from workers import spans

    with spans.run(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}, RUN.request_id
    ):
        spans.run_started(RUN)
        span = spans.call_started(DEPLOYMENT, 1)
        spans.call_ended(span, REPLY)


def cpu_us(fn: Callable[[], None], n: int) -> float:
    for _ in range(min(n, 500)):  # warm: label children, caches, first imports
        fn()
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    args = parser.parse_args()

    from broker_config.logs import configure_logging

    devnull = open(os.devnull, "w")  # noqa: SIM115 (the process's whole life)
    configure_logging(Settings(log_format="json"), stream=devnull)
    with otlp_sink() as sink_url:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink_url
        from broker_config import tracing

        assert tracing.configure("headrace-worker")
        parts = {
            "metrics": cpu_us(metrics_of_one_request, args.requests),
            "logs": cpu_us(logs_of_one_request, args.requests),
            "traces": cpu_us(traces_of_one_request, args.requests),
        }
        tracing.shutdown()
    print("| part | CPU per request |")
    print("|---|---|")
    for name, us in parts.items():
        print(f"| {name} | {us:.0f} us |")
    print(f"| all three | {sum(parts.values()):.0f} us |")


if __name__ == "__main__":
    main()
