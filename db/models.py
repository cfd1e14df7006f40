"""The ledger's tables. Same schema on PostgreSQL and SQLite (see db/migrations)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from db.types import JsonDoc, Money, UTCDateTime

# Named constraints, so Alembic's batch mode (SQLite) can drop and recreate them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Integer on SQLite: only INTEGER PRIMARY KEY autoincrements there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Standard Webhooks signing secret ("whsec_" + base64), and where batch events go by default.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # What an anomaly of this tenant does besides its event: "none", or "pause" its bulk and default
    # work until ``headrace tenants resume`` (workers/anomalies.py). Paused while paused_at is set.
    on_anomaly: Mapped[str] = mapped_column(String(8), default="none", server_default="none")
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    paused_reason: Mapped[str | None] = mapped_column(Text)


class Budget(Base):
    """What one tenant (or one tag of its requests, ``feature=search``) may spend per UTC day or
    month, in USD, and what Headrace does as it fills (its ladder). Enforced at admission in Redis
    (workers/budgets.py); this row is the truth the Redis counters are rebuilt from."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_budgets_tenant_id_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200))
    tag_key: Mapped[str | None] = mapped_column(String(100))  # None: every request of the tenant
    tag_value: Mapped[str | None] = mapped_column(String(200))
    period: Mapped[str] = mapped_column(String(8))  # day | month (UTC)
    limit_usd: Mapped[Decimal] = mapped_column(Money)
    # [{"at": 0.8, "action": "defer"}, {"at": 0.9, "action": "downgrade", "routes": {"smart":
    # "fast"}}, {"at": 1.0, "action": "refuse"}]: each step from its share of the limit on
    ladder: Mapped[list[dict[str, Any]]] = mapped_column(JsonDoc)
    on_anomaly: Mapped[str] = mapped_column(String(8), default="none", server_default="none")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    # SHA-256 of the whole key. Keys carry 256 random bits, so a fast hash is enough: there
    # is nothing to brute-force, and lookups stay one indexed equality.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # An admin key may read across tenants (the usage report); a tenant key sees its own tenant.
    admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class EndCounts:
    """What a batch's ended requests add up to, kept in the same transaction as each request's end
    so that reading a batch of 50,000 lines never scans its requests: on the batch's own row (cancel
    and expiry) and on each of its counter shares (``BatchCounter``)."""

    succeeded_count: Mapped[int] = mapped_column(Integer, default=0)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    cancelled_count: Mapped[int] = mapped_column(Integer, default=0)
    expired_count: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    unpriced_attempts: Mapped[int] = mapped_column(Integer, default=0)


class Batch(EndCounts, Base):
    __tablename__ = "batches"
    __table_args__ = (Index("ix_batches_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    status: Mapped[str] = mapped_column(String(20))
    priority: Mapped[str] = mapped_column(String(20))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JsonDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    total_count: Mapped[int] = mapped_column(Integer)  # its other counters: EndCounts
    # Which front door created it (native, openai, anthropic), and what that API needs to echo.
    api: Mapped[str] = mapped_column(String(16), default="native", server_default="native")
    endpoint: Mapped[str | None] = mapped_column(String(64))
    input_file_id: Mapped[str | None] = mapped_column(String(40))
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc)  # why it failed validation
    webhook_url: Mapped[str | None] = mapped_column(Text)
    # Deleted through the Anthropic API: gone from that API, kept in the ledger with its costs.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BatchCounter(EndCounts, Base):
    """A share of a batch's counters (db/batch_state.py). Every request's end adds to one of a
    batch's COUNTER_SHARDS rows, chosen by the request: updates of one row go one at a time, each
    waiting for the previous commit, so one row per batch capped a batch at ~2,200 ends a second
    (docs/scale.md). A batch's counters are its own row's plus the sum of these."""

    __tablename__ = "batch_counters"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), primary_key=True)
    shard: Mapped[int] = mapped_column(SmallInteger, primary_key=True)


class LlmRequest(Base):
    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("batch_id", "custom_id", name="uq_requests_batch_id_custom_id"),
        Index("ix_requests_batch_id_line_no", "batch_id", "line_no"),
        # The publisher sweep looks for committed-but-unpublished requests.
        Index("ix_requests_status_published_at", "status", "published_at"),
        # The anomaly detector: what ended in its last interval, and how often one prompt came
        # lately (workers/anomalies.py).
        Index("ix_requests_ended_at", "ended_at"),
        Index("ix_requests_prompt_hash_created_at", "prompt_hash", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"))
    line_no: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(200))
    body: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    # Attribution (feature, user, ...: settings.attribution_tags), from the batch's metadata and the
    # line's own, fixed at accept. NULL on rows written before it existed.
    tags: Mapped[dict[str, str] | None] = mapped_column(JsonDoc)
    # Its model and prompt, hashed (db/prompts.py): the same prompt over and over is a runaway loop.
    prompt_hash: Mapped[str | None] = mapped_column(String(16))
    priority: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    response: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    deployment: Mapped[str | None] = mapped_column(String(200))
    # What Headrace did to it on its way, for its result line: {"trimmed_messages": n}.
    notes: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    # Times it waited in the delay queue for provider trouble to pass; its backoff grows with it.
    park_rounds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The lease token of the run that owns it while RUNNING (random per run; see workers/leases.py).
    # Every change of a running request is guarded by it; the recovery sweep requeues a request
    # whose lease has expired in Redis.
    lease: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Of input_tokens, what its calls read from and wrote to the provider's prompt cache (the sums
    # of its attempts'), kept here so that usage reports read requests only.
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0))
    # Of cost_usd, what its calls that did not answer cost (retried, fell back, refused, lost); and
    # its calls that ended with no price known. Kept so that usage reports read requests only.
    overhead_cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")
    unpriced_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Answered without a call of its own (cache, semantic_cache, coalesced: workers/answer_cache.py),
    # and what the call that first gave its answer cost.
    served_from: Mapped[str | None] = mapped_column(String(20))
    saved_cost_usd: Mapped[Decimal] = mapped_column(Money, default=Decimal(0), server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Attempt(Base):
    """One provider call, and its cost: exactly one row per call, even when it failed."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("request_id", "attempt_no", name="uq_attempts_request_id_attempt_no"),
        Index("ix_attempts_deployment_started_at", "deployment", "started_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"))
    attempt_no: Mapped[int] = mapped_column(Integer)
    deployment: Mapped[str] = mapped_column(String(200))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    http_status: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc)
    latency_ms: Mapped[int | None] = mapped_column(Integer)
    # Streamed calls only: time to the first chunk of output, and the rest of latency_ms after it.
    first_chunk_ms: Mapped[int | None] = mapped_column(Integer)
    generation_ms: Mapped[int | None] = mapped_column(Integer)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # Of input_tokens, those the provider read from / wrote to its prompt cache (priced at its
    # cache rates: workers/costing.py).
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    cache_write_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # NULL when no price is known for the model (recorded with a warning, never a crash).
    cost_usd: Mapped[Decimal | None] = mapped_column(Money)
    cost_estimated: Mapped[bool] = mapped_column(Boolean, default=False)
    estimated_input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    saved_cost_usd: Mapped[Decimal | None] = mapped_column(Money)  # cache_hit/coalesced: the call not made
    provider_request_id: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(Text)  # for people: which worker process made the call
    lease: Mapped[str | None] = mapped_column(String(64))  # the run that made it (in flight: alive?)


class File(Base):
    """A file uploaded through the OpenAI-compatible Files API (batch input)."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column("bytes", BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    content: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)


class WebhookDelivery(Base):
    """One event to deliver to one URL, retried until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_webhook_deliveries_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # also the webhook-id header
    # None: the operator's copy of an event (HEADRACE_OPS_WEBHOOK_URL), signed with the operator's
    # secret and listed to no tenant.
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))  # None: not a batch's event
    event_type: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookAttempt(Base):
    """Every POST of a delivery, kept for the tenant to inspect."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (
        UniqueConstraint("delivery_id", "attempt_no", name="uq_webhook_attempts_delivery_id_attempt_no"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"))
    attempt_no: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)


class Event(Base):
    """Something the pool noticed about a tenant and tells it about (``GET /v1/events``, webhook
    ``anomaly.detected``): spend or tokens per request jumping past their baseline, a request rate
    far over it, the same prompt over and over (workers/anomalies.py)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_tenant_id_created_at", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    kind: Mapped[str] = mapped_column(String(40))
    subject: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # what it is about: feature, prompt hash
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)  # observed, baseline, factor, window
    action: Mapped[str] = mapped_column(String(8), default="none")  # none | paused
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
