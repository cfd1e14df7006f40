"""The price of one call: the deployment's own override, else the genai-prices table."""

from __future__ import annotations

import logging
import threading
from decimal import Decimal

import genai_prices

from broker_config.deployments import Deployment
from workers.providers.base import Usage

log = logging.getLogger(__name__)
MTOK = Decimal(1_000_000)

_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def call_cost_usd(deployment: Deployment, usage: Usage) -> Decimal | None:
    """Cost of one call in USD, exact; None when no price is known (warned once per model)."""
    if deployment.input_price_per_mtok is not None and deployment.output_price_per_mtok is not None:
        return _override_cost_usd(
            deployment, deployment.input_price_per_mtok, deployment.output_price_per_mtok, usage
        )
    try:
        price = genai_prices.calc_price(
            genai_prices.Usage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            ),
            model_ref=deployment.model,
            provider_id=deployment.provider,
        )
    except LookupError:
        _warn_unknown(deployment)
        return None
    return Decimal(price.total_price)


def _override_cost_usd(
    deployment: Deployment, input_price: Decimal, output_price: Decimal, usage: Usage
) -> Decimal:
    # usage.input_tokens counts cache reads and writes too; each is priced at its own rate, the
    # input price when the deployment names none.
    read_price = deployment.cache_read_price_per_mtok
    write_price = deployment.cache_write_price_per_mtok
    uncached = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
    return (
        uncached * input_price
        + usage.cache_read_tokens * (input_price if read_price is None else read_price)
        + usage.cache_write_tokens * (input_price if write_price is None else write_price)
        + usage.output_tokens * output_price
    ) / MTOK


def _warn_unknown(deployment: Deployment) -> None:
    key = (deployment.provider, deployment.model)
    with _warned_lock:
        if key in _warned:
            return
        _warned.add(key)
    log.warning(
        "no price known for %s model %r (deployment %r): its calls are recorded with unknown cost;"
        " set input_price_per_mtok / output_price_per_mtok in the deployments file",
        deployment.provider,
        deployment.model,
        deployment.name,
    )
