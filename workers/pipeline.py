"""One request, top to bottom: claim it, walk its route's chain, call, classify, record."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from broker_config.deployments import Deployment, DeploymentsConfig, Route
from broker_config.settings import Settings
from db.engine import Database
from db.states import AttemptOutcome, RequestStatus
from db.types import utcnow
from workers import ledger
from workers.costing import call_cost_usd
from workers.estimate import estimate_prompt_tokens, requested_max_tokens
from workers.policy import Step, backoff_s, classify
from workers.providers.base import CallFailed, ProviderAdapter, ProviderCall, ProviderReply, Usage

log = logging.getLogger(__name__)

_OUTCOME_OF_STEP = {
    Step.RETRY: AttemptOutcome.RETRY,
    Step.FALL_BACK: AttemptOutcome.FALLBACK,
    Step.FAIL: AttemptOutcome.FATAL,
}


@dataclass(frozen=True)
class Deps:
    """Everything a run needs; tests build their own."""

    db: Database
    config: DeploymentsConfig
    settings: Settings
    adapters: Mapping[str, ProviderAdapter]
    worker: str
    sleep: Callable[[float], None] = field(default=time.sleep)


def run_request(request_id: str, deps: Deps) -> None:
    """Run one request to its end. Safe to call again for the same id (redelivery)."""
    run = ledger.begin_run(
        deps.db,
        request_id,
        # An attempt older than any call can last has lost its worker.
        stale_attempt_s=_longest_call_s(deps) + 60,
        estimate_lost=partial(_estimate_cost, deps.config),
        estimated_output_tokens=lambda body: requested_max_tokens(body, deps.settings.default_max_tokens),
    )
    if run is None:
        return
    route = deps.config.resolve(run.model)
    if route is None:
        message = f"no route or deployment serves model {run.model!r} any more"
        _end(deps, request_id, RequestStatus.FAILED, {"kind": "config", "message": message})
        return
    failures: list[dict[str, Any]] = []
    for name in route.deployments:
        if _try_deployment(run, deps.config.deployment(name), route, deps, failures):
            return
    message = f"every deployment of route {route.name!r} failed"
    _end(
        deps,
        request_id,
        RequestStatus.FAILED,
        {"kind": "exhausted", "message": message, "deployments": failures},
        deployment=failures[-1]["deployment"] if failures else None,
    )


def _end(
    deps: Deps, request_id: str, status: RequestStatus, error: dict[str, Any], deployment: str | None = None
) -> None:
    ledger.end_run(deps.db, request_id, ledger.RequestEnd(status, error=error, deployment=deployment))


def _longest_call_s(deps: Deps) -> float:
    settings = deps.settings
    return max(
        (d.timeout_s or settings.call_timeout_s) + (d.connect_timeout_s or settings.connect_timeout_s)
        for d in deps.config.deployments
    )


def _try_deployment(
    run: ledger.RunStart, deployment: Deployment, route: Route, deps: Deps, failures: list[dict[str, Any]]
) -> bool:
    """Attempts on one deployment; True when the request has ended (any way), False to fall back."""
    settings = deps.settings
    max_attempts = route.max_attempts_per_deployment or settings.max_attempts_per_deployment
    call = ProviderCall(
        deployment=deployment,
        body=run.body,
        timeout_s=deployment.timeout_s or settings.call_timeout_s,
        connect_timeout_s=deployment.connect_timeout_s or settings.connect_timeout_s,
        default_max_tokens=deployment.max_output_tokens or settings.default_max_tokens,
    )
    adapter = deps.adapters[deployment.provider]
    for retry_no in range(max_attempts):
        if utcnow() >= run.expires_at:
            message = "the batch's completion window passed"
            _end(deps, run.request_id, RequestStatus.EXPIRED, {"kind": "expired", "message": message})
            return True
        attempt_no = ledger.begin_attempt(
            deps.db,
            run.request_id,
            deployment=deployment.name,
            provider=deployment.provider,
            model=deployment.model,
            estimated_input_tokens=estimate_prompt_tokens(run.body),
            worker=deps.worker,
        )
        if attempt_no is None:
            return True  # ended elsewhere (cancelled, or a duplicate delivery finished it)
        started = time.monotonic()
        outcome = call_provider(adapter, call)
        latency_ms = round((time.monotonic() - started) * 1000)
        if isinstance(outcome, ProviderReply):
            ledger.finish_attempt(
                deps.db,
                run.request_id,
                attempt_no,
                ledger.AttemptResult(
                    AttemptOutcome.SUCCESS,
                    latency_ms,
                    http_status=outcome.http_status,
                    usage=outcome.usage,
                    cost_usd=call_cost_usd(deployment, outcome.usage),
                    provider_request_id=outcome.provider_request_id,
                ),
                ledger.RequestEnd(RequestStatus.SUCCEEDED, response=outcome.body, deployment=deployment.name),
            )
            return True
        step = classify(outcome)
        error = {**outcome.as_error(), "deployment": deployment.name, "attempt": attempt_no}
        result = ledger.AttemptResult(
            _OUTCOME_OF_STEP[step],
            latency_ms,
            http_status=outcome.status,
            error=error,
            provider_request_id=outcome.provider_request_id,
        )
        log.info(
            "request %s attempt %d on %s: %s -> %s",
            run.request_id,
            attempt_no,
            deployment.name,
            outcome.message[:200],
            step,
        )
        if step is Step.FAIL:
            ledger.finish_attempt(
                deps.db,
                run.request_id,
                attempt_no,
                result,
                ledger.RequestEnd(
                    RequestStatus.FAILED,
                    error=error,
                    deployment=deployment.name,
                ),
            )
            return True
        ledger.finish_attempt(deps.db, run.request_id, attempt_no, result)
        if step is Step.FALL_BACK or retry_no + 1 == max_attempts:
            failures.append(error)
            return False
        delay = backoff_s(
            retry_no,
            base_s=settings.backoff_base_s,
            max_s=settings.backoff_max_s,
            retry_after_s=outcome.retry_after_s,
        )
        if delay > settings.max_inline_wait_s:
            # Holding a worker slot this long starves every other request; let the chain go on.
            failures.append({**error, "message": f"{error['message']} (asked to wait {delay:.0f}s)"})
            return False
        deps.sleep(delay)
    return False


def call_provider(adapter: ProviderAdapter, call: ProviderCall) -> ProviderReply | CallFailed:
    """The call, with every failure turned into a ``CallFailed``: never raises."""
    try:
        return adapter.complete(call)
    except CallFailed as failure:
        return failure
    except Exception as exc:  # an adapter bug must not lose the request or its attempt row
        log.exception("adapter %s raised %s", adapter.name, type(exc).__name__)
        return CallFailed(f"{type(exc).__name__}: {exc}", kind="invalid_reply")


def _estimate_cost(
    config: DeploymentsConfig, deployment: str, tokens_in: int, tokens_out: int
) -> Decimal | None:
    try:
        dep = config.deployment(deployment)
    except KeyError:
        return None
    return call_cost_usd(dep, Usage(tokens_in, tokens_out))
