"""Provider adapters, by the ``provider`` name a deployment gives. Add a provider: one file, one entry.

Each adapter's module imports its provider's SDK, and those imports are most of a worker's start-up
(the anthropic SDK alone is about 0.9 s of CPU, openai's 0.3 s): a worker makes only the adapters
its deployments name.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module

from workers.providers.base import ProviderAdapter

# provider name -> (module, adapter class): imported only when a deployment names the provider.
ADAPTERS = {
    "openai": ("workers.providers.openai", "OpenAIAdapter"),
    "anthropic": ("workers.providers.anthropic", "AnthropicAdapter"),
}


def default_adapters(providers: Iterable[str] | None = None) -> dict[str, ProviderAdapter]:
    """The adapters of ``providers`` (every provider known, by default)."""
    names = ADAPTERS if providers is None else sorted(set(providers))
    adapters: dict[str, ProviderAdapter] = {}
    for name in names:
        module, adapter = ADAPTERS[name]
        adapters[name] = getattr(import_module(module), adapter)()
    return adapters
