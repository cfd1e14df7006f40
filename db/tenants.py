"""Tenants and their API keys. A key is shown once, at creation; the ledger keeps its hash."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.engine import Database
from db.ids import new_id
from db.models import ApiKey, Tenant
from db.types import utcnow

KEY_PREFIX = "hr_"


@dataclass(frozen=True)
class NewKey:
    tenant_id: str
    tenant_name: str
    key: str  # the only time the clear key exists
    admin: bool = False


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(db: Database, tenant_name: str, *, admin: bool = False) -> NewKey:
    """A new key for ``tenant_name``, creating the tenant on first use. An ``admin`` key also
    reads across tenants (the usage report); on the batch routes it is its tenant's key."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)

    def unit(session: Session) -> NewKey:
        tenant = session.scalars(select(Tenant).where(Tenant.name == tenant_name)).one_or_none()
        if tenant is None:
            tenant = Tenant(id=new_id("ten"), name=tenant_name, created_at=utcnow())
            session.add(tenant)
            session.flush()
        session.add(
            ApiKey(
                id=new_id("key"),
                tenant_id=tenant.id,
                key_hash=hash_key(key),
                prefix=key[:10],
                created_at=utcnow(),
                admin=admin,
            )
        )
        return NewKey(tenant_id=tenant.id, tenant_name=tenant.name, key=key, admin=admin)

    return db.transact(unit)


def tenant_for_key(session: Session, key: str) -> tuple[Tenant, bool] | None:
    """The tenant a live key belongs to and whether it is an admin key, or None (unknown or
    revoked). One indexed query: every authenticated request makes it."""
    row = session.execute(
        select(Tenant, ApiKey.admin)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    ).one_or_none()
    return None if row is None else (row[0], bool(row[1]))


def webhook_secret(session: Session, tenant: Tenant, *, rotate: bool = False) -> str:
    """The tenant's Standard Webhooks signing secret, made on first use (or anew when rotating)."""
    if tenant.webhook_secret is None or rotate:
        tenant.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    return tenant.webhook_secret


def _tenant_named(session: Session, name: str) -> Tenant:
    tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one_or_none()
    if tenant is None:
        raise LookupError(f"no tenant named {name!r} (create one with: headrace keys create --tenant {name})")
    return tenant


def tenant_webhook_secret(db: Database, tenant_name: str, *, rotate: bool = False) -> str:
    return db.transact(
        lambda session: webhook_secret(session, _tenant_named(session, tenant_name), rotate=rotate)
    )


def set_tenant_webhook_url(db: Database, tenant_name: str, url: str | None) -> None:
    """The URL that batches without their own webhook report to (None: no default)."""

    def unit(session: Session) -> None:
        _tenant_named(session, tenant_name).webhook_url = url

    db.transact(unit)
