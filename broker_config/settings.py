"""One settings object for every process (API, workers, CLI), read from ``HEADRACE_*`` variables."""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path(".headrace")
# Labels of the token and cost counters that an attribution tag may not shadow.
RESERVED_LABELS = frozenset({"tenant", "route", "deployment", "token_type", "le", "instance", "job"})
_NOT_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def tag_label(key: str) -> str:
    """The Prometheus label an attribution key becomes: ``team-name`` -> ``team_name``."""
    label = _NOT_LABEL.sub("_", key.strip())
    return f"_{label}" if label[:1].isdigit() else label


# The similarity a semantic hit needs with the default (wordllama) embedder, measured on the labelled
# pairs of tests/data/semantic_pairs.jsonl (bench/semantic_quality.py): the lowest where no different
# question hits but word-order swaps ("Celsius to Fahrenheit" / "Fahrenheit to Celsius", identical to
# a bag of tokens; 2.5%). It serves reworded near-duplicates (case, punctuation, a greeting, a typo:
# 69%) and few real paraphrases (6%). Another embedder needs its own, measured the same way.
SEMANTIC_THRESHOLD = 0.95


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEADRACE_", extra="ignore")

    database_url: str = Field(
        default=f"sqlite:///{DEFAULT_HOME / 'headrace.db'}",
        description="SQLAlchemy URL of the ledger; postgresql+psycopg://... in production.",
    )
    database_pool_size: int | None = Field(
        default=None,
        ge=1,
        description="PostgreSQL connections each process keeps (2 more at a peak); default: a "
        "worker's threads + 2 (its sweeps and webhooks), 10 for the API and the CLI.",
    )
    database_prepared_statements: bool = Field(
        default=True,
        description="false behind PgBouncer in transaction mode (before 1.21, or without "
        "max_prepared_statements): psycopg would prepare statements a later transaction cannot see.",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Broker and bucket Redis: redis://host:port/db, or a Sentinel group "
        "sentinel://host:26379/0;sentinel://host2:26379/0 (broker_config/redis_clients.py).",
    )
    redis_sentinel_master: str = Field(
        default="mymaster", description="The Sentinel group's name, when redis_url is a sentinel:// URL."
    )
    redis_sentinel_password: str | None = Field(
        default=None, description="The sentinels' own password, when they ask for one."
    )
    state_redis_url: str | None = Field(
        default=None,
        description="Buckets, breakers, leases and fallback counts on a Redis of their own (default: "
        "redis_url's): one server or Sentinel group as redis_url, or with state_redis_cluster a Redis "
        "Cluster, its nodes as comma-separated redis:// URLs. The broker, its delay queue and the "
        "housekeeping locks stay on redis_url (kombu has no cluster transport).",
    )
    state_redis_cluster: bool = Field(
        default=False, description="state_redis_url names the nodes of a Redis Cluster."
    )
    state_redis_sentinel_master: str | None = Field(
        default=None,
        description="The Sentinel group's name when state_redis_url is a sentinel:// URL "
        "(default: redis_sentinel_master; the sentinels' password is redis_sentinel_password).",
    )
    cache_redis_url: str | None = Field(
        default=None,
        description="Cached answers (routes with cache = exact|semantic) on a Redis that evicts (an LRU "
        "maxmemory-policy): never the broker's, which must not. Default: redis_url with the next db "
        "index, and /readyz warns while that server's policy is noeviction.",
    )
    coalesce_wait_s: float = Field(
        default=20.0,
        gt=0,
        description="How long a request waits in its worker for an identical one in flight before it "
        "steps back to the delay queue (and looks again).",
    )
    semantic_threshold: float = Field(
        default=SEMANTIC_THRESHOLD,
        gt=0,
        le=1,
        description="Routes with cache = semantic and no similarity_threshold of their own: the least "
        "cosine similarity of two questions one answer serves (bench/semantic_quality.py measures it).",
    )
    semantic_max_entries: int = Field(
        default=2000, ge=1, description="Questions one semantic index keeps (the oldest go first)."
    )
    embeddings_deployment: str | None = Field(
        default=None,
        description="A deployment (OpenAI-compatible /v1/embeddings) that embeds questions for the "
        "semantic cache; default: wordllama's model, offline in the worker.",
    )
    config: Path = Field(default=Path("headrace.toml"), description="The deployments/routes TOML file.")

    # API
    max_batch_lines: int = Field(default=50_000, ge=1)
    max_batch_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    default_completion_window_s: int = Field(default=24 * 3600, ge=60)
    public_base_url: str | None = Field(default=None, description="Externally visible API URL.")
    max_request_bytes: int = Field(
        default=1024 * 1024, ge=1, description="Body cap of every route but the batch uploads."
    )
    # Anthropic's Messages API refuses requests over 32 MB: a longer line could never run.
    max_line_bytes: int = Field(default=32 * 1024 * 1024, ge=1, description="Longest batch input line.")
    file_retention_days: int = Field(
        default=30, ge=1, description="Uploaded files and batch results are purged after this."
    )

    # Workers
    worker_concurrency: int = Field(default=8, ge=1)
    call_timeout_s: float = Field(default=60.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reservation_margin_s: float = Field(
        default=60.0,
        gt=0,
        description="How much longer than its call a reservation (rate-limit room, budget) lives unsettled.",
    )
    max_attempts_per_deployment: int = Field(default=3, ge=1)
    max_attempts_per_request: int = Field(
        default=12,
        ge=1,
        description="Calls one request may make that the provider may have charged for, across all runs.",
    )
    park_base_s: float = Field(
        default=2.0, gt=0, description="First wait of a request that met only provider trouble."
    )
    park_max_s: float = Field(
        default=300.0, gt=0, description="Longest wait of a request between rounds of provider trouble."
    )
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=8.0, gt=0)
    max_inline_wait_s: float = Field(default=20.0, ge=0, description="Longest backoff held in a slot.")
    # kombu redelivers anything unacked for longer than this; it must exceed the longest
    # fetch-to-ack time (all attempts and backoffs of one request). Same on every process.
    visibility_timeout_s: int = Field(default=1800, ge=10)
    worker_task_events: bool = Field(
        default=False,
        description="Workers send Celery task events from the start (Flower switches them on "
        "while it runs anyway).",
    )
    # Rate limits (the shared bucket)
    bucket_max_inline_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="Waits for tokens up to this long happen in place; longer ones go "
        "back to the queue with a delay (or to the next deployment of the chain).",
    )
    bucket_floor_default: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Share of each limit a default-priority request must leave for interactive ones.",
    )
    bucket_floor_bulk: float = Field(default=0.10, ge=0, lt=1, description="Same, for bulk requests.")
    bucket_floor_idle_s: float = Field(
        default=30.0,
        gt=0,
        description="On a continuous limit, a floor is lent out while no priority above it has asked "
        "for this long (stepped limits always keep theirs).",
    )
    # Learned output reservations, on deployments with learn_output (workers/output_estimate.py)
    output_samples_min: int = Field(
        default=50,
        ge=1,
        description="Real answers a route must have had on a deployment before its calls reserve the "
        "learned output there instead of the whole max_tokens.",
    )
    output_samples_kept: int = Field(
        default=1000, ge=1, description="The latest kept per route and deployment."
    )
    output_quantile: float = Field(default=0.99, gt=0, le=1, description="Of those answers' output tokens.")
    output_margin: float = Field(default=1.2, ge=1, description="The quantile times this is reserved.")
    output_floor_tokens: int = Field(default=32, ge=1, description="Never less per completion.")
    output_refresh_s: float = Field(default=5.0, gt=0, description="A process reads each figure this often.")
    rate_factor_on_429: float = Field(default=0.7, gt=0, le=1)
    rate_factor_min: float = Field(default=0.2, gt=0, le=1)
    rate_factor_recovery_per_s: float = Field(default=0.01, ge=0)
    # Circuit breakers (one per deployment, shared)
    breaker_window_s: float = Field(default=30.0, gt=0)
    breaker_min_calls: int = Field(default=10, ge=1)
    breaker_failure_ratio: float = Field(default=0.5, gt=0, le=1)
    breaker_open_s: float = Field(default=2.0, gt=0)
    breaker_probes: int = Field(default=2, ge=1)
    breaker_consecutive_failures: int = Field(
        default=10, ge=0, description="Failures in a row that open a breaker at once (0: only the ratio)."
    )

    # Crash recovery
    lease_ttl_s: float = Field(
        default=15.0,
        gt=1,
        description="A run whose lease is not refreshed this long is dead; its request is requeued.",
    )
    ledger_hold_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a worker holds a write (a paid call's cost row first) through a ledger outage.",
    )
    worker_id: str | None = Field(
        default=None, description="This worker process's name on the attempts it makes (default host:pid)."
    )
    max_deliveries: int = Field(default=8, ge=1, description="Runs that may die with their worker.")
    lost_message_check_s: float = Field(default=60.0, gt=0)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    publish_grace_s: float = Field(default=30.0, ge=0)
    default_max_tokens: int = Field(default=1024, ge=1)

    # Logs (broker_config.logs)
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="auto: JSON lines, or the console renderer when stderr is a terminal."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="The root logger's level (a worker's --loglevel overrides it)."
    )
    log_content: bool = Field(
        default=False,
        description="Prompt and completion text (and provider error bodies, which may echo them) may "
        "be logged; keys never are.",
    )

    # Webhooks
    webhook_allow_hosts: str | None = Field(
        default=None, description="Hosts or CIDRs webhooks may target although not public (comma-separated)."
    )
    webhook_retry_schedule_s: str = Field(
        default="5,30,120,600,1800,3600,7200,14400,28800",
        description="Waits between delivery attempts (about 15 h in all); then the delivery is failed.",
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0)

    # Anomalies and runaway loops (workers/anomalies.py)
    anomaly_interval_s: float = Field(
        default=60.0,
        gt=0,
        description="How often spend, tokens and requests are judged, per tenant and feature.",
    )
    anomaly_half_life_s: float = Field(
        default=3 * 3600.0,
        gt=0,
        description="Half-life of the rolling (EWMA) baseline each is judged against.",
    )
    anomaly_min_intervals: int = Field(
        default=5, ge=1, description="Intervals a baseline must have seen before it judges anything."
    )
    anomaly_factor: float = Field(
        default=3.0, gt=1, description="An interval over this many times its baseline is an anomaly."
    )
    anomaly_cooldown_s: float = Field(
        default=3600.0,
        ge=0,
        description="One event per tenant, feature and kind in this long, not one per interval.",
    )
    anomaly_min_spend_usd: float = Field(
        default=0.05, ge=0, description="Spend per interval below which no spend jump is an anomaly."
    )
    anomaly_min_requests: int = Field(
        default=10,
        ge=1,
        description="Requests per interval below which neither their rate nor their tokens per request "
        "is judged.",
    )
    anomaly_min_tokens_per_request: int = Field(
        default=256, ge=0, description="Tokens per request below which no jump in them is an anomaly."
    )
    runaway_repeats: int = Field(
        default=20,
        ge=1,
        description="The same prompt from one tenant more often than this in the window: a loop.",
    )
    runaway_window_s: float = Field(default=600.0, gt=0, description="The repeated-prompt window.")
    ops_webhook_url: str | None = Field(
        default=None, description="Where every anomaly.detected event also goes (the operator's receiver)."
    )
    ops_webhook_secret: str | None = Field(
        default=None,
        description='Standard Webhooks secret ("whsec_" + base64) the operator\'s events are signed with.',
    )
    hold_recheck_s: float = Field(
        default=30.0,
        gt=0,
        description="A request held back (its budget says wait, its tenant is paused) is looked at again "
        "after this.",
    )
    budget_refresh_s: float = Field(
        default=5.0,
        gt=0,
        description="At least how often a worker re-reads the budgets (also whenever one is set or deleted).",
    )

    # Metrics (broker_config.metrics): each worker process serves its own /metrics.
    metrics_enabled: bool = Field(default=True, description="Record and serve worker metrics.")
    worker_metrics_port: int = Field(
        default=9464, ge=0, le=65535, description="Port of a worker's /metrics (0: not served)."
    )
    worker_metrics_host: str = Field(default="127.0.0.1", description="Interface a worker's /metrics binds.")
    attribution_keys: str = Field(
        default="feature,user",
        description="Metadata keys (the batch's, overridden by a line's own) kept on each request as "
        "its attribution tags (comma-separated).",
    )
    metric_tag_keys: str = Field(
        default="feature",
        description="Attribution keys (among HEADRACE_ATTRIBUTION_KEYS) that label the token and cost "
        "counters (comma-separated).",
    )
    metric_label_values: int = Field(
        default=50, ge=1, description="Distinct values a tenant or tag label keeps per process; then 'other'."
    )

    # Flower: "user:password[,user2:password2]"; without it Flower's API answers only on loopback.
    flower_basic_auth: str | None = None

    # The CLI as a client of a running API (submit, status, results)
    api_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None

    @field_validator("metric_tag_keys")
    @classmethod
    def _tag_keys_are_labels(cls, value: str) -> str:
        for key in (k.strip() for k in value.split(",") if k.strip()):
            if tag_label(key) in RESERVED_LABELS:
                raise ValueError(f"metric tag key {key!r} would shadow the label {tag_label(key)!r}")
        return value

    @model_validator(mode="after")
    def _metric_tags_are_attribution_tags(self) -> Settings:
        # A request keeps only the attribution keys as tags: any other label would stay empty. The
        # default ("feature") is dropped quietly when the attribution keys leave it out.
        named = (k.strip() for k in self.metric_tag_keys.split(",") if k.strip())
        missing = [k for k in named if k not in self.attribution_tags]
        if missing and "metric_tag_keys" in self.model_fields_set:
            raise ValueError(
                f"metric tag key(s) {', '.join(map(repr, missing))} must be among the attribution keys "
                f"(HEADRACE_ATTRIBUTION_KEYS={self.attribution_keys!r})"
            )
        return self

    @field_validator("ops_webhook_secret")
    @classmethod
    def _secret_is_base64(cls, value: str | None) -> str | None:
        # Checked here, not at the first anomaly: a secret that cannot sign would fail every delivery.
        if value is not None:
            try:
                if not base64.b64decode(value.removeprefix("whsec_") + "==", validate=False):
                    raise ValueError
            except (ValueError, binascii.Error):
                raise ValueError('ops webhook secret: "whsec_" + base64 of at least one byte') from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def metric_tags(self) -> tuple[str, ...]:
        """The attribution keys that are labels of the token and cost counters."""
        keys = (k.strip() for k in self.metric_tag_keys.split(",") if k.strip())
        return tuple(k for k in keys if k in self.attribution_tags)

    @property
    def attribution_tags(self) -> tuple[str, ...]:
        """The metadata keys a request keeps as its tags (what spend is attributed to)."""
        return tuple(k.strip() for k in self.attribution_keys.split(",") if k.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
