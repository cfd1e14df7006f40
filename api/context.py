"""What every route needs, built once per API process and reached through ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from redis import Redis
from sqlalchemy.orm import Session

from api.errors import ApiError
from broker_config.deployments import DeploymentsConfig
from broker_config.settings import Settings
from db.engine import Database
from db.models import Tenant
from db.tenants import tenant_for_key


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    db: Database
    config: DeploymentsConfig
    redis: Redis  # the broker's: readiness, the delay queue
    state_redis: Redis  # buckets, breakers, fallback counts (HEADRACE_STATE_REDIS_URL)
    cache_redis: Redis | None = None  # cached answers (HEADRACE_CACHE_REDIS_URL): readiness warns


def _context(request: Request) -> AppContext:
    context: AppContext = request.app.state.headrace
    return context


Context = Annotated[AppContext, Depends(_context)]


def _api_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    # The Anthropic SDKs before 2.0 send the key as x-api-key.
    return request.headers.get("x-api-key") or None


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key's tenant, and whether it is an admin key (``keys create --admin``)."""

    tenant: Tenant
    admin: bool


def _caller(request: Request, context: Context) -> Caller:
    key = _api_key(request)
    if key is None:
        raise ApiError(
            401,
            "authentication_error",
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    with context.db.session() as session:
        found = tenant_for_key(session, key)
    if found is None:
        raise ApiError(
            401, "authentication_error", "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"}
        )
    return Caller(*found)


CurrentCaller = Annotated[Caller, Depends(_caller)]


# FastAPI caches a dependency per request: a route that takes both CurrentTenant and CurrentCaller
# (or AdminCaller) looks its key up once.
def _tenant(caller: CurrentCaller) -> Tenant:
    return caller.tenant


CurrentTenant = Annotated[Tenant, Depends(_tenant)]


def _admin(caller: CurrentCaller) -> Caller:
    if not caller.admin:
        raise ApiError(
            403, "permission_error", "this needs an admin key (headrace keys create --tenant NAME --admin)"
        )
    return caller


AdminCaller = Annotated[Caller, Depends(_admin)]


def _read_session(context: Context) -> Iterator[Session]:
    with context.db.session() as session:
        yield session


ReadSession = Annotated[Session, Depends(_read_session)]


def _visible(tenant: str, caller: CurrentCaller) -> str:
    if not caller.admin and tenant != caller.tenant.name:
        raise ApiError(404, "not_found", f"no tenant named {tenant!r}")
    return tenant


def _manageable(tenant: Annotated[str, Depends(_visible)], caller: CurrentCaller) -> str:
    if not caller.admin:
        raise ApiError(
            403, "permission_error", "this needs an admin key (headrace keys create --tenant NAME --admin)"
        )
    return tenant


# A tenant named in a path. Dependencies, not checks in the routes: they answer before a body is
# read, so that another tenant's name is a 404 whatever is sent.
VisibleTenant = Annotated[str, Depends(_visible)]
ManagedTenant = Annotated[str, Depends(_manageable)]
