"""Traces, when the standard ``OTEL_*`` variables ask for them; the one place that sets them up.

On when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set, or when
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``); off when ``OTEL_SDK_DISABLED``
is true or ``OTEL_TRACES_EXPORTER`` is ``none``. OTLP goes over HTTP with protobuf bodies (the
only ``OTEL_EXPORTER_OTLP_PROTOCOL`` served). The SDK reads the rest itself: ``OTEL_SERVICE_NAME``
(else each process's default, ``headrace-api`` or ``headrace-worker``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, the exporter's headers, timeout and compression.

Off, nothing of OpenTelemetry is imported and every helper here is a check of one global.

The provider is this module's own, not registered as OpenTelemetry's global one: the Anthropic
SDK traces its calls itself through the global provider (a second span per call, with prompts in
it when ``ANTHROPIC_OPEN_TELEMETRY_TRACES_CONTENT_MODE=content``). Headrace's spans are one per
provider call whatever the provider, and never hold a prompt or a completion.

The trace context travels from the API to the workers in each Celery message's headers
(``traceparent``, ``tracestate``: W3C Trace Context), through ``inject`` and ``extract``.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Literal

import structlog

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import AttributeValue

log = structlog.get_logger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
OTLP_PROTOCOL = "http/protobuf"
SpanKindName = Literal["internal", "server", "client", "producer", "consumer"]

_lock = threading.Lock()
_configured = False
_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def wanted_exporters(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The span exporters the environment asks for (``otlp``, ``console``); empty: tracing off."""
    if _truthy(environ.get("OTEL_SDK_DISABLED")):
        return ()
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not named:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        named = "otlp" if any(environ.get(e) for e in endpoints) else "none"
    exporters: list[str] = []
    for name in (n.strip() for n in named.split(",")):
        if name in ("", "none") or name in exporters:
            continue
        if name not in ("otlp", "console"):
            log.warning("traces: exporter not served here (otlp, console); ignored", exporter=name)
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or OTLP_PROTOCOL
            )
            if protocol.strip().lower() != OTLP_PROTOCOL:
                log.warning("traces: OTLP protocol not served here (only http/protobuf)", protocol=protocol)
                continue
        exporters.append(name)
    return tuple(exporters)


def configure(service_name: str) -> bool:
    """Set up this process's tracer provider if the environment asks for traces; once per process
    (later calls change nothing). ``service_name`` is the default for ``OTEL_SERVICE_NAME``.
    Returns whether traces are on."""
    global _configured, _provider, _tracer
    with _lock:
        if _configured:
            return _tracer is not None
        _configured = True
        exporters = wanted_exporters(os.environ)
        if not exporters:
            return False
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        version = _version()
        attributes: dict[str, AttributeValue] = {SERVICE_VERSION: version}
        named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""
        )
        if not named:  # the environment's name wins over ours
            attributes[SERVICE_NAME] = service_name
        # Our own exit hook (below) shuts it down once, after the worker's shutdown signal or at exit.
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        for name in exporters:
            provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        _provider = provider
        _tracer = provider.get_tracer("headrace", version)
        atexit.register(shutdown)
        service = provider.resource.attributes.get(SERVICE_NAME)
        log.info("traces on", service=service, exporters=list(exporters))
        return True


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("headrace")
    except PackageNotFoundError:
        return "unknown"


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_EXPORTER_OTLP_*


def enabled() -> bool:
    """Whether this process records spans (a global read: cheap enough for every call path)."""
    return _tracer is not None


def tracer() -> Tracer:
    """This process's tracer: the SDK's when traces are on, else OpenTelemetry's no-op tracer."""
    if _tracer is not None:
        return _tracer
    from opentelemetry.trace import NoOpTracer

    return NoOpTracer()


def span(
    name: str,
    *,
    kind: SpanKindName = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
    parent: Context | None = None,
) -> AbstractContextManager[Span | None]:
    """A span made current for the block (its parent: ``parent``, else the current span); yields
    None and costs nothing when traces are off. An exception leaving the block sets it to ERROR."""
    if _tracer is None:
        return nullcontext()
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind[kind.upper()], attributes=attributes
    )


def inject(carrier: dict[str, Any]) -> dict[str, Any]:
    """Add the current span's W3C trace context (``traceparent``, ``tracestate``) to ``carrier``;
    adds nothing when traces are off or no span is current. Returns ``carrier``."""
    if _tracer is not None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        TraceContextTextMapPropagator().inject(carrier)
    return carrier


def extract(carrier: Mapping[str, Any] | None) -> Context | None:
    """The trace context ``inject`` put in ``carrier`` (None when it holds none, or traces are off)."""
    if _tracer is None or not carrier or not carrier.get("traceparent"):
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    found = {k: str(carrier[k]) for k in TRACE_HEADERS if carrier.get(k)}
    return TraceContextTextMapPropagator().extract(found)


@contextmanager
def attached(carrier: Mapping[str, Any] | None) -> Iterator[None]:
    """Run the block in the trace context of ``carrier`` (what ``inject`` wrote earlier, maybe in
    another thread) without starting a span: messages published inside carry it on."""
    context = extract(carrier)
    if context is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


def flush(timeout_ms: int = 5000) -> None:
    """Export the spans ended so far (best-effort, bounded by ``timeout_ms``)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def shutdown() -> None:
    """Export what is left and stop exporting: at a worker's shutdown, and at exit. Idempotent."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()
