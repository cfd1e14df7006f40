"""The worker's spans (``broker_config.tracing`` sets traces up): one per run of a request, a child
of the batch accept whose message carried its context, and one per provider call, in the GenAI
conventions' terms. Never a prompt or a completion. While traces are off each helper is a check.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from broker_config import tracing
from broker_config.deployments import Deployment
from workers import observe
from workers.providers.base import CallFailed, ProviderReply

if TYPE_CHECKING:
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

    from workers.ledger import RunStart

# Where each provider's SDK goes when a deployment names no base_url.
DEFAULT_HOSTS = {"openai": "api.openai.com", "anthropic": "api.anthropic.com"}


def run(headers: Any, request_id: str) -> AbstractContextManager[Span | None]:
    """The span of one run of a request; ``headers``: the Celery task's request, whose message
    headers carry the accepting span's context."""
    if not tracing.enabled():
        return nullcontext()
    carrier = {name: headers.get(name) for name in tracing.TRACE_HEADERS}
    return tracing.span(
        "headrace.request.run",
        kind="consumer",
        parent=tracing.extract(carrier),
        attributes={"headrace.request.id": request_id},
    )


def run_started(run: RunStart) -> None:
    """What the run learned from the ledger, on the run's span."""
    if not tracing.enabled():
        return
    from opentelemetry import trace

    trace.get_current_span().set_attributes(
        {
            "headrace.batch.id": run.batch_id,
            "headrace.route": run.model,
            "headrace.priority": run.priority,
            "headrace.tenant": run.tenant,
        }
    )


def call_started(deployment: Deployment, attempt_no: int) -> Span | None:
    """The span of one provider call, a child of the run's (``call_ended`` ends it)."""
    if not tracing.enabled():
        return None
    from opentelemetry.trace import SpanKind

    host, port = server(deployment.provider, deployment.base_url)
    attributes: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": deployment.provider,
        "gen_ai.request.model": deployment.model,
        "server.address": host,
        "headrace.deployment": deployment.name,
        "headrace.attempt": attempt_no,
    }
    if port is not None:
        attributes["server.port"] = port
    name = f"chat {deployment.model}"
    return tracing.tracer().start_span(name, kind=SpanKind.CLIENT, attributes=attributes)


def call_ended(span: Span | None, outcome: ProviderReply | CallFailed) -> None:
    """The call's answer (model, usage) or its failure (``error.type``, status ERROR), and its end."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    if isinstance(outcome, ProviderReply):
        model, reply_id = outcome.body.get("model"), outcome.body.get("id")
        if isinstance(model, str):
            span.set_attribute("gen_ai.response.model", model)
        if isinstance(reply_id, str):
            span.set_attribute("gen_ai.response.id", reply_id)
        span.set_attribute("gen_ai.usage.input_tokens", outcome.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", outcome.usage.output_tokens)
    else:
        error = observe.error_type(outcome)
        span.set_attribute("error.type", error)
        if outcome.status:
            span.set_attribute("http.response.status_code", outcome.status)
        # The kind, not the provider's message: an error body may echo the prompt.
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


@lru_cache(maxsize=256)
def server(provider: str, base_url: str | None) -> tuple[str, int | None]:
    """``server.address`` and (when the URL names one) ``server.port`` of a deployment's endpoint."""
    if not base_url:
        return DEFAULT_HOSTS.get(provider, provider), None
    parts = urlsplit(base_url)
    return parts.hostname or base_url, parts.port
