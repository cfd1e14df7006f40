"""Provider adapters, by the ``provider`` name a deployment gives. Add a provider: one file, one entry."""

from __future__ import annotations

from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import ProviderAdapter
from workers.providers.openai import OpenAIAdapter


def default_adapters() -> dict[str, ProviderAdapter]:
    return {"openai": OpenAIAdapter(), "anthropic": AnthropicAdapter()}
