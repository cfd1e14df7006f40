"""Traces across real processes: the API's accept of a batch and the workers' runs and provider
calls reach an OTLP/HTTP receiver as one trace per batch; with no OTEL_* variable, nothing of
OpenTelemetry's SDK is loaded."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from sqlalchemy import select

from broker_config.tracing import wanted_exporters
from db.engine import get_database
from db.models import Attempt, LlmRequest
from headrace.stack import DEFAULT_CONFIG, EmbeddedStack
from tests.test_end_to_end import wait_ended

# The default deployments, plus one whose URL the simulator does not serve (a 404: fall back) and
# a route that tries it first: a request on it fails once, then succeeds on the next deployment.
CONFIG = (
    DEFAULT_CONFIG
    + """
[[deployments]]
name = "gone"
provider = "openai"
model = "gpt-4o-mini"
base_url = "{sim}/gone/v1"
api_key_env = "{key_env}"

[[routes]]
name = "flaky"
deployments = ["gone", "claude-haiku"]
"""
)


@dataclass(frozen=True)
class Received:
    service: str
    span: Span

    def attr(self, key: str) -> Any:
        for item in self.span.attributes:
            if item.key == key:
                return _value(item.value)
        return None


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver on a free loopback port: POST /v1/traces, protobuf bodies."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.add(ExportTraceServiceRequest.FromString(body))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, export: ExportTraceServiceRequest) -> None:
        for resource_spans in export.resource_spans:
            service = next(
                (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope in resource_spans.scope_spans:
                with self.lock:
                    self.spans.extend(Received(service, span) for span in scope.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def test_the_environment_decides_whether_and_where_spans_go() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert wanted_exporters({}) == ()
    assert wanted_exporters(endpoint) == ("otlp",)
    assert wanted_exporters({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}) == ("otlp",)
    assert wanted_exporters({**endpoint, "OTEL_SDK_DISABLED": "true"}) == ()
    assert wanted_exporters({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) == ()
    assert wanted_exporters({"OTEL_TRACES_EXPORTER": "console,otlp,zipkin"}) == ("console", "otlp")
    assert wanted_exporters({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == ()
    assert wanted_exporters({**endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == ("otlp",)


def test_without_otel_variables_no_sdk_is_loaded_and_no_trace_header_is_sent(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from broker_config import tracing\n"
        "assert tracing.configure('headrace-worker') is False\n"
        "assert tracing.inject({'a': 1}) == {'a': 1} and tracing.extract({'traceparent': 'x'}) is None\n"
        "with tracing.span('s') as span:\n"
        "    assert span is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.slow
def test_a_batch_is_one_trace_from_the_api_accept_to_each_provider_call(
    receiver: Receiver, tmp_path: Path
) -> None:
    """The API's accept span is the parent of each request's run span (the worker's, carried in
    the Celery message headers); each run's provider calls are its children, with the GenAI
    attributes; a failed call has error.type and status ERROR; API and worker name themselves."""
    stack = EmbeddedStack(
        tmp_path / "stack",
        config_template=CONFIG,
        worker_concurrency=4,
        simulator_args=("--latency-ms", "5"),  # no random faults: the failures below are the only ones
        extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "HEADRACE_BACKOFF_BASE_S": "0.05",
        },
    )
    requests = [
        {"custom_id": "plain-1", "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}},
        {"custom_id": "plain-2", "body": {"model": "smart", "messages": [{"role": "user", "content": "yo"}]}},
        {"custom_id": "flaky", "body": {"model": "flaky", "messages": [{"role": "user", "content": "hm"}]}},
        {
            "custom_id": "refused",  # a 400: no retry anywhere, the request fails
            "body": {"model": "fast", "messages": [{"role": "user", "content": "no [[sim:status=400]]"}]},
        },
    ]
    try:
        stack.start()
        with httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
        ) as http:
            response = http.post("/v1/batches", json={"requests": requests, "priority": "interactive"})
            assert response.status_code == 201, response.text
            batch_id = response.json()["id"]
            wait_ended(http, [batch_id], timeout_s=120)
    finally:
        stack.stop()  # each process exports what it holds as it stops
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    with db.session() as session:
        batch_requests = session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id))
        ids = {r.custom_id: r.id for r in batch_requests}
        rows = session.execute(
            select(Attempt.request_id, Attempt.attempt_no, Attempt.deployment).where(
                Attempt.request_id.in_(ids.values())
            )
        ).all()
    ledger_attempts = {(r.request_id, r.attempt_no): r.deployment for r in rows}

    spans = receiver.spans
    accepts = [s for s in spans if s.span.name == "headrace.batch.accept"]
    assert len(accepts) == 1, [s.span.name for s in spans]
    accept = accepts[0]
    assert accept.service == "headrace-api" and accept.span.kind == Span.SPAN_KIND_PRODUCER
    assert accept.attr("headrace.batch.id") == batch_id
    assert accept.attr("headrace.batch.request_count") == 4
    assert accept.attr("headrace.priority") == "interactive"
    assert accept.attr("headrace.tenant")

    runs = {s.attr("headrace.request.id"): s for s in spans if s.span.name == "headrace.request.run"}
    assert set(runs) == set(ids.values())
    for run in runs.values():
        assert run.service == "headrace-worker" and run.span.kind == Span.SPAN_KIND_CONSUMER
        assert run.span.trace_id == accept.span.trace_id and run.span.parent_span_id == accept.span.span_id
        assert run.attr("headrace.batch.id") == batch_id
        assert run.attr("headrace.priority") == "interactive" and run.attr("headrace.tenant")
    assert runs[ids["flaky"]].attr("headrace.route") == "flaky"

    calls = [s for s in spans if s.attr("gen_ai.operation.name") == "chat"]
    # Our span per call, and no other: the Anthropic SDK's own spans (it traces its calls through
    # OpenTelemetry's global provider, which Headrace leaves alone) are not exported.
    assert {s.span.name for s in spans} == {"headrace.batch.accept", "headrace.request.run"} | {
        f"chat {c.attr('gen_ai.request.model')}" for c in calls
    }
    by_attempt = {}
    for call in calls:
        run = next(r for r in runs.values() if r.span.span_id == call.span.parent_span_id)
        assert call.service == "headrace-worker" and call.span.kind == Span.SPAN_KIND_CLIENT
        assert call.span.trace_id == accept.span.trace_id
        assert call.span.name == f"chat {call.attr('gen_ai.request.model')}"
        assert call.attr("server.address") == "127.0.0.1"
        by_attempt[(run.attr("headrace.request.id"), call.attr("headrace.attempt"))] = call
    # One span per provider call, as the ledger counts them.
    assert {k: c.attr("headrace.deployment") for k, c in by_attempt.items()} == ledger_attempts
    assert len(by_attempt) == len(calls)

    for call in by_attempt.values():
        failed = call.attr("error.type") is not None
        assert (call.span.status.code == Status.STATUS_CODE_ERROR) == failed
        if not failed:
            assert call.attr("gen_ai.response.model") and call.attr("gen_ai.usage.output_tokens") > 0
            assert call.attr("gen_ai.usage.input_tokens") > 0
    flaky = [by_attempt[k] for k in sorted(k for k in by_attempt if k[0] == ids["flaky"])]
    assert [c.attr("headrace.deployment") for c in flaky] == ["gone", "claude-haiku"]
    assert flaky[0].attr("error.type") == "404" and flaky[0].attr("gen_ai.provider.name") == "openai"
    assert flaky[1].attr("gen_ai.provider.name") == "anthropic" and flaky[1].attr("error.type") is None
    refused = [c for k, c in by_attempt.items() if k[0] == ids["refused"]]
    assert [c.attr("error.type") for c in refused] == ["400"]
    assert "no [[sim" not in str([s.span for s in spans])  # never a prompt
