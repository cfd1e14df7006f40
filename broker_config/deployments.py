"""The deployments file: which provider endpoints exist and which routes producers may ask for.

```toml
[[deployments]]
name = "openai-mini"
provider = "openai"                 # openai (any OpenAI-compatible base_url) | anthropic
model = "gpt-4o-mini"
base_url = "http://127.0.0.1:9100/v1"
api_key_env = "OPENAI_API_KEY"
rpm = 500
tpm = 200000
stream = false                      # true: streamed calls, time to first chunk in the ledger

[[routes]]
name = "fast"
deployments = ["openai-mini", "claude-haiku"]
```

A bad file fails at load with a `ConfigError` naming the file, the entry and the field.
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Provider = Literal["openai", "anthropic"]


class ConfigError(Exception):
    """The deployments file is missing or wrong; the message says where."""


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._:-]+$")
    provider: Provider
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key_env: str | None = None
    rpm: int = Field(default=500, gt=0)
    tpm: int = Field(default=200_000, gt=0)
    itpm: int | None = Field(default=None, gt=0)
    otpm: int | None = Field(default=None, gt=0)
    input_price_per_mtok: Decimal | None = Field(default=None, ge=0)
    output_price_per_mtok: Decimal | None = Field(default=None, ge=0)
    # With the override above, what prompt-cache reads and writes cost; left out, they are priced
    # at input_price_per_mtok (no cache discount assumed). Without an override, genai-prices' cache
    # rates apply.
    cache_read_price_per_mtok: Decimal | None = Field(default=None, ge=0)
    cache_write_price_per_mtok: Decimal | None = Field(default=None, ge=0)
    timeout_s: float | None = Field(default=None, gt=0)
    connect_timeout_s: float | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    # Call the provider in streaming mode and record each call's time to first chunk and generation
    # time. Off by default: measured (bench/pipeline.py --stream, README "Streaming"), streaming
    # cost 15.7-16.3 ms of worker CPU per request against 8.9-13.2 ms unstreamed (the SDKs build an
    # object per chunk), and a batch result gains nothing from arriving in pieces.
    stream: bool = False
    # Reserve the learned output (p99 x margin of the route's real answers) on the limits where the
    # provider counts real output, instead of max_tokens: workers/output_estimate.py says which.
    learn_output: bool = False

    @model_validator(mode="after")
    def _prices_come_in_pairs(self) -> Deployment:
        if (self.input_price_per_mtok is None) != (self.output_price_per_mtok is None):
            raise ValueError("input_price_per_mtok and output_price_per_mtok must be given together")
        cache_prices = (self.cache_read_price_per_mtok, self.cache_write_price_per_mtok)
        if self.input_price_per_mtok is None and any(p is not None for p in cache_prices):
            raise ValueError("cache prices need input_price_per_mtok and output_price_per_mtok too")
        return self

    @property
    def key_env(self) -> str:
        """The variable holding this deployment's key (the provider's usual one by default)."""
        return self.api_key_env or f"{self.provider.upper()}_API_KEY"

    def limits(self) -> dict[str, int]:
        """The per-minute limits the bucket enforces for this deployment, by name.

        OpenAI counts requests and tokens (prompt + max_tokens at admission). Anthropic counts
        requests, input tokens and output tokens separately; without itpm/otpm, ``tpm`` bounds
        the sum instead.
        """
        limits = {"requests": self.rpm}
        if self.provider == "anthropic" and (self.itpm or self.otpm):
            if self.itpm:
                limits["input_tokens"] = self.itpm
            if self.otpm:
                limits["output_tokens"] = self.otpm
        else:
            limits["tokens"] = self.tpm
        return limits

    def api_key(self) -> str:
        """The key from the environment; the file only names the variable."""
        return os.environ.get(self.key_env, "")


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    deployments: tuple[str, ...] = Field(min_length=1)
    max_attempts_per_deployment: int | None = Field(default=None, ge=1)
    max_attempts_per_request: int | None = Field(default=None, ge=1)
    deadline_s: float | None = Field(default=None, gt=0, description="From submission to the last call.")
    # A per-request input budget: a prompt estimated over it is refused, or trimmed to fit (system
    # messages and the latest turns kept, the oldest dropped; workers/input_budget.py).
    max_input_tokens: int | None = Field(default=None, gt=0)
    on_overflow: Literal["refuse", "trim"] = "refuse"
    # Answers served again (workers/answer_cache.py): off, the exact request, or one whose messages
    # mean the same (within similarity_threshold). Only reproducible requests (temperature 0) unless
    # cache_nondeterministic; n > 1 and tools only when allowed. Scope: per tenant, or every tenant.
    cache: Literal["off", "exact", "semantic"] = "off"
    cache_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    cache_scope: Literal["tenant", "global"] = "tenant"
    cache_nondeterministic: bool = False
    cache_n: bool = False
    cache_tools: bool = False
    similarity_threshold: float | None = Field(default=None, gt=0, le=1)
    # Identical cacheable requests in flight at once make one call; the others wait for its answer.
    coalesce: bool = True


class TenantLimits(BaseModel):
    """A tenant's own ceiling on every deployment, on top of the deployment's limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)

    def limits(self) -> dict[str, int]:
        return {k: v for k, v in (("requests", self.rpm), ("tokens", self.tpm)) if v is not None}


class DeploymentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deployments: tuple[Deployment, ...] = Field(min_length=1)
    routes: tuple[Route, ...] = ()
    tenants: tuple[TenantLimits, ...] = ()

    @model_validator(mode="after")
    def _names_resolve(self) -> DeploymentsConfig:
        seen: set[str] = set()
        for i, dep in enumerate(self.deployments):
            if dep.name in seen:
                raise _EntryError(f"deployments[{i}] (name={dep.name!r})", "name", "duplicate name")
            seen.add(dep.name)
        route_names: set[str] = set()
        for i, route in enumerate(self.routes):
            where = f"routes[{i}] (name={route.name!r})"
            if route.name in route_names:
                raise _EntryError(where, "name", "duplicate name")
            route_names.add(route.name)
            for dep_name in route.deployments:
                if dep_name not in seen:
                    raise _EntryError(where, "deployments", f"unknown deployment {dep_name!r}")
        tenant_names: set[str] = set()
        for i, tenant in enumerate(self.tenants):
            if tenant.name in tenant_names:
                raise _EntryError(f"tenants[{i}] (name={tenant.name!r})", "name", "duplicate name")
            tenant_names.add(tenant.name)
        return self

    def tenant_limits(self, name: str) -> TenantLimits | None:
        return next((t for t in self.tenants if t.name == name), None)

    def deployment(self, name: str) -> Deployment:
        for dep in self.deployments:
            if dep.name == name:
                return dep
        raise KeyError(name)

    def resolve(self, model: str) -> Route | None:
        """The chain serving ``model``: a route by name, else the deployments named or serving it."""
        for route in self.routes:
            if route.name == model:
                return route
        chain = tuple(d.name for d in self.deployments if model in (d.name, d.model))
        return Route(name=model, deployments=chain) if chain else None

    def model_names(self) -> list[str]:
        """Every name a producer may put in ``model``."""
        names = [r.name for r in self.routes]
        for dep in self.deployments:
            names.extend(n for n in (dep.name, dep.model) if n not in names)
        return names


class _EntryError(ValueError):
    def __init__(self, entry: str, field: str, message: str) -> None:
        super().__init__(f"{entry}: field {field!r}: {message}")


def _format_validation_error(path: Path, raw: dict[str, object], exc: ValidationError) -> str:
    lines = [f"{path}: invalid deployments file"]
    errors = exc.errors()
    deep = {e["loc"][0] for e in errors if len(e["loc"]) > 1}
    for err in errors:
        loc = list(err["loc"])
        if err["type"] == "too_short" and len(loc) == 1 and loc[0] in deep:
            continue  # a consequence of an entry's own error, which is reported instead
        where = ""
        if len(loc) >= 2 and isinstance(loc[1], int) and isinstance(loc[0], str):
            section, index = loc[0], loc[1]
            entries = raw.get(section)
            name = None
            if isinstance(entries, list) and index < len(entries) and isinstance(entries[index], dict):
                name = entries[index].get("name")
            where = f"{section}[{index}]" + (f" (name={name!r})" if name else "")
            field = ".".join(str(p) for p in loc[2:]) or "(entry)"
            lines.append(f"  {where}: field {field!r}: {err['msg']}")
        else:
            ctx_err = err.get("ctx", {}).get("error")
            if isinstance(ctx_err, _EntryError):
                lines.append(f"  {ctx_err}")
            else:
                field = ".".join(str(p) for p in loc) or "(file)"
                lines.append(f"  field {field!r}: {err['msg']}")
    return "\n".join(lines)


def parse_config(text: str, path: Path) -> DeploymentsConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return DeploymentsConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, raw, exc)) from None


def load_config(path: Path) -> DeploymentsConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: deployments file not found (set HEADRACE_CONFIG to its path)") from None
    return parse_config(text, path)
