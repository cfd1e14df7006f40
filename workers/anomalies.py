"""Anomalies and runaway loops, found in the ledger by one worker at a time (a housekeeping job under
a Redis lock, ``HEADRACE_ANOMALY_INTERVAL_S``). Each run judges the interval since the last one, per
tenant and feature (a request's ``tags["feature"]``):

    kind                 observed in the interval                       an anomaly when past
    spend_rate           cost of the requests that ended (USD)          factor x baseline, min spend
    tokens_per_request   their input + output tokens per request        factor x baseline, min tokens
                         that made a call (not judged on fewer than
                         HEADRACE_ANOMALY_MIN_REQUESTS of them)
    request_rate         requests accepted                              factor x baseline, min requests
    repeated_prompt      one prompt hash from one tenant in the last    HEADRACE_RUNAWAY_REPEATS
                         HEADRACE_RUNAWAY_WINDOW_S (no baseline)

Spend is read from the requests that ended, not from the calls that started: a request's cost is
final when it ends (its end and its last cost row are one transaction), while a call that started
in an interval may be costed after that interval was judged, and would never count. The request
rate is read from requests accepted: a producer in a loop shows at the door, before rate limits
flatten what ends.

Baselines (kept in the state Redis, rebuilt by learning again if lost): per tenant, feature and
kind, an exponentially weighted mean of the intervals observed, decayed by time with a half-life
(``HEADRACE_ANOMALY_HALF_LIFE_S``) and corrected for its start (the first intervals weigh alike).
Rates are per ``HEADRACE_ANOMALY_INTERVAL_S``, whatever the run's real interval. An interval without
traffic for a feature is no observation: a tenant that sends a batch an hour is judged against its
rate while it sends, not against its idle hours. Nothing is judged before a baseline has seen
``HEADRACE_ANOMALY_MIN_INTERVALS`` intervals. An anomalous interval enters its baseline clamped to
the threshold (factor x baseline): one spike moves the baseline by a bounded step, and a level that
stays becomes the norm over about the half-life, not at once, nor never.

Events are kept by ``db.events.record_finding``: one per tenant, feature and kind per
``HEADRACE_ANOMALY_COOLDOWN_S`` (the ledger is asked, so a lost Redis repeats none).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import redis
import structlog
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from broker_config import keys
from broker_config.settings import Settings
from db.engine import Database
from db.events import EventKind, Finding, event_view, record_finding
from db.ids import id_floor
from db.models import Batch, LlmRequest, Tenant
from db.types import utcnow
from workers import observe

log = structlog.get_logger(__name__)
# Rows stamped this close to now may not be committed yet; the interval ends this far back. (A batch
# of 50,000 lines commits seconds after its ids are made: some of its requests may be missing from
# that interval's request rate; their spend counts when they end.)
SETTLE_S = 5.0
# After a pause of the pool, one run judges at most this many intervals (the rest is skipped).
MAX_CATCH_UP = 5
# A run judges once at least this share of an interval has passed since the last one judged.
DUE_SHARE = 0.8
BASELINE_TTL_S = 7 * 86400
FEATURE = "feature"


@dataclass(frozen=True)
class Policy:
    interval_s: float
    half_life_s: float
    min_intervals: int
    factor: float

    @classmethod
    def of(cls, settings: Settings) -> Policy:
        return cls(
            settings.anomaly_interval_s,
            settings.anomaly_half_life_s,
            settings.anomaly_min_intervals,
            settings.anomaly_factor,
        )


@dataclass(frozen=True)
class Baseline:
    """An exponentially weighted mean, its weights decayed by time: ``weighted_sum / weight``."""

    weighted_sum: float = 0.0
    weight: float = 0.0
    intervals: int = 0
    at_s: float = 0.0  # when last updated (epoch seconds)

    @property
    def mean(self) -> float:
        return self.weighted_sum / self.weight if self.weight else 0.0

    def add(self, value: float, now_s: float, half_life_s: float) -> Baseline:
        decay = 0.5 ** (max(0.0, now_s - self.at_s) / half_life_s) if self.intervals else 0.0
        return Baseline(
            self.weighted_sum * decay + value, self.weight * decay + 1.0, self.intervals + 1, now_s
        )


def judge(
    baseline: Baseline, value: float, *, floor: float, now_s: float, policy: Policy
) -> tuple[bool, Baseline]:
    """Whether ``value`` is an anomaly against ``baseline`` (past factor x baseline and the floor,
    once the baseline has seen enough), and the baseline to keep: an anomaly enters it clamped."""
    threshold = policy.factor * baseline.mean
    anomalous = baseline.intervals >= policy.min_intervals and value > threshold and value >= floor
    kept = min(value, threshold) if anomalous else value
    return anomalous, baseline.add(kept, now_s, policy.half_life_s)


@dataclass(frozen=True)
class Interval:
    since: datetime
    until: datetime

    @property
    def seconds(self) -> float:
        return (self.until - self.since).total_seconds()


@dataclass(frozen=True)
class Observation:
    tenant_id: str
    feature: str | None
    kind: EventKind
    value: float  # per interval for rates
    floor: float  # below it, no anomaly whatever the baseline
    unit: str


# --- What the ledger says about an interval ----------------------------------------------------------


def _feature() -> Any:
    return LlmRequest.tags[FEATURE].as_string()


def ended_figures(session: Session, interval: Interval) -> list[Any]:
    """Per tenant and feature, the requests that ended in the interval: how many, how many made a
    call, their cost and tokens (``ix_requests_ended_at``)."""
    feature = _feature()
    called = LlmRequest.attempt_count > 0
    statement = (
        select(
            Batch.tenant_id,
            feature.label("feature"),
            func.count().label("requests"),
            func.coalesce(func.sum(case((called, 1), else_=0)), 0).label("called"),
            func.coalesce(func.sum(LlmRequest.cost_usd), 0).label("cost"),
            func.coalesce(func.sum(LlmRequest.input_tokens + LlmRequest.output_tokens), 0).label("tokens"),
        )
        .join(Batch, Batch.id == LlmRequest.batch_id)
        .where(LlmRequest.ended_at >= interval.since, LlmRequest.ended_at < interval.until)
        .group_by(Batch.tenant_id, feature)
    )
    return list(session.execute(statement))


def _accepted_in(interval: Interval) -> Any:
    # Request ids sort by the time they were made at accept: the primary key's index answers this.
    since_ms, until_ms = (int(t.timestamp() * 1000) for t in (interval.since, interval.until))
    return (LlmRequest.id >= id_floor("req", since_ms)) & (LlmRequest.id < id_floor("req", until_ms))


def accepted_counts(session: Session, interval: Interval) -> list[Any]:
    """Per tenant and feature, the requests accepted in the interval."""
    feature = _feature()
    statement = (
        select(Batch.tenant_id, feature.label("feature"), func.count().label("requests"))
        .join(Batch, Batch.id == LlmRequest.batch_id)
        .where(_accepted_in(interval))
        .group_by(Batch.tenant_id, feature)
    )
    return list(session.execute(statement))


def repeated_prompts(session: Session, interval: Interval, window_s: float, repeats: int) -> list[Any]:
    """(tenant, prompt hash, times, a feature) for each prompt a tenant sent more than ``repeats``
    times in the ``window_s`` before the interval's end, among the prompts seen in the interval
    (a count can only cross the line when one more comes). Each count is a range of the index
    (prompt_hash, created_at)."""
    seen = select(LlmRequest.prompt_hash).where(_accepted_in(interval), LlmRequest.prompt_hash.is_not(None))
    statement = (
        select(
            Batch.tenant_id,
            LlmRequest.prompt_hash,
            func.count().label("times"),
            func.max(_feature()).label("feature"),
        )
        .join(Batch, Batch.id == LlmRequest.batch_id)
        .where(
            LlmRequest.prompt_hash.in_(seen.distinct().scalar_subquery()),
            LlmRequest.created_at >= interval.until - timedelta(seconds=window_s),
            LlmRequest.created_at < interval.until,
        )
        .group_by(Batch.tenant_id, LlmRequest.prompt_hash)
        .having(func.count() > repeats)
    )
    return list(session.execute(statement))


# --- The job ----------------------------------------------------------------------------------------


class AnomalyDetector:
    """The housekeeping job: claim the next interval, judge it, record what is new."""

    def __init__(self, db: Database, client: redis.Redis, settings: Settings) -> None:
        self.db, self.redis, self.settings = db, client, settings
        self.policy = Policy.of(settings)
        if settings.ops_webhook_url and not settings.ops_webhook_secret:
            log.warning(
                "HEADRACE_OPS_WEBHOOK_URL is set without HEADRACE_OPS_WEBHOOK_SECRET: no operator copies"
            )

    def __call__(self) -> int:
        return self.run(utcnow())

    def run(self, now: datetime) -> int:
        """Judge the interval ending (a moment) before ``now`` if one is due; the events raised."""
        interval = self._claim(now)
        if interval is None:
            return 0
        with self.db.session() as session:
            ended = ended_figures(session, interval)
            accepted = accepted_counts(session, interval)
            repeated = repeated_prompts(
                session, interval, self.settings.runaway_window_s, self.settings.runaway_repeats
            )
        observations = self._observations(interval, ended, accepted)
        findings = self._judge(observations, interval) + self._loops(repeated)
        return sum(self._record(finding) for finding in findings)

    def _claim(self, now: datetime) -> Interval | None:
        """The interval from the end of the last one judged to a moment ago, once due; None when not
        due, or when another run (a lock that expired under a slow one) has just claimed it."""
        step_ms = self.policy.interval_s * 1000
        until_ms = int(now.timestamp() * 1000 - min(SETTLE_S, self.policy.interval_s / 2) * 1000)
        cursor = self.redis.get(keys.anomaly_cursor())
        last_ms = int(cursor) if cursor is not None else int(until_ms - step_ms)
        if until_ms - last_ms < DUE_SHARE * step_ms:
            return None
        if not self.redis.set(keys.anomaly_window(last_ms), until_ms, nx=True, px=int(step_ms * 10)):
            return None
        # Moved before the ledger is read: an interval whose reading fails is skipped, not read twice.
        self.redis.set(keys.anomaly_cursor(), until_ms)
        since_ms = max(last_ms, int(until_ms - MAX_CATCH_UP * step_ms))
        return Interval(_moment(since_ms), _moment(until_ms))

    def _observations(
        self, interval: Interval, ended: Iterable[Any], accepted: Iterable[Any]
    ) -> list[Observation]:
        s = self.settings
        per_interval = self.policy.interval_s / interval.seconds
        found: list[Observation] = []
        for row in ended:
            spend = float(row.cost) * per_interval
            found.append(
                Observation(
                    row.tenant_id, row.feature, EventKind.SPEND_RATE, spend, s.anomaly_min_spend_usd, "usd"
                )
            )
            called = int(row.called)
            if called >= s.anomaly_min_requests:
                found.append(
                    Observation(
                        row.tenant_id,
                        row.feature,
                        EventKind.TOKENS_PER_REQUEST,
                        int(row.tokens) / called,
                        s.anomaly_min_tokens_per_request,
                        "tokens",
                    )
                )
        for row in accepted:
            found.append(
                Observation(
                    row.tenant_id,
                    row.feature,
                    EventKind.REQUEST_RATE,
                    int(row.requests) * per_interval,
                    s.anomaly_min_requests,
                    "requests",
                )
            )
        return found

    def _judge(self, observations: Sequence[Observation], interval: Interval) -> list[Finding]:
        """Each observation against its baseline (read and written back in one round trip each)."""
        by_tenant: dict[str, list[Observation]] = defaultdict(list)
        for item in observations:
            by_tenant[item.tenant_id].append(item)
        tenants = sorted(by_tenant)
        pipe = self.redis.pipeline(transaction=False)
        for tenant_id in tenants:
            pipe.hgetall(keys.anomaly_baselines(tenant_id))
        stored = cast(list[dict[bytes, bytes]], pipe.execute())
        now_s = interval.until.timestamp()
        findings: list[Finding] = []
        pipe = self.redis.pipeline(transaction=False)
        for tenant_id, baselines in zip(tenants, stored, strict=True):
            updated: dict[str, str] = {}
            for item in by_tenant[tenant_id]:
                field = json.dumps([item.kind.value, item.feature])
                before = _baseline(baselines.get(field.encode()))
                anomalous, after = judge(
                    before, item.value, floor=item.floor, now_s=now_s, policy=self.policy
                )
                updated[field] = json.dumps([after.weighted_sum, after.weight, after.intervals, after.at_s])
                if anomalous:
                    findings.append(self._finding(item, before, interval))
            pipe.hset(keys.anomaly_baselines(tenant_id), mapping=cast(dict[Any, Any], updated))
            pipe.expire(keys.anomaly_baselines(tenant_id), BASELINE_TTL_S)
        pipe.execute()
        return findings

    def _finding(self, item: Observation, before: Baseline, interval: Interval) -> Finding:
        detail = {
            "observed": round(item.value, 9),
            "baseline": round(before.mean, 9),
            "factor": self.policy.factor,
            "unit": item.unit,
            "window_s": self.policy.interval_s,
            "interval": [interval.since.isoformat(), interval.until.isoformat()],
            "intervals_seen": before.intervals,
        }
        return Finding(item.tenant_id, item.kind, {FEATURE: item.feature}, detail)

    def _loops(self, repeated: Iterable[Any]) -> list[Finding]:
        """One finding per tenant and feature: its most repeated prompt, and how many were over."""
        worst: dict[tuple[str, str | None], list[Any]] = defaultdict(list)
        for row in repeated:
            worst[(row.tenant_id, row.feature)].append(row)
        findings = []
        for (tenant_id, feature), rows in worst.items():
            top = max(rows, key=lambda r: (int(r.times), r.prompt_hash))
            detail = {
                "observed": int(top.times),
                "threshold": self.settings.runaway_repeats,
                "window_s": self.settings.runaway_window_s,
                "repeated_prompts": len(rows),
            }
            subject = {FEATURE: feature, "prompt_hash": top.prompt_hash}
            findings.append(Finding(tenant_id, EventKind.REPEATED_PROMPT, subject, detail))
        return findings

    def _record(self, finding: Finding) -> bool:
        s = self.settings
        ops_url = s.ops_webhook_url if s.ops_webhook_secret else None

        def unit(session: Session) -> dict[str, Any] | None:
            now = utcnow()
            event = record_finding(session, finding, now, cooldown_s=s.anomaly_cooldown_s, ops_url=ops_url)
            tenant = session.get(Tenant, finding.tenant_id) if event else None
            return event_view(event, tenant.name) if event and tenant else None

        view = self.db.transact(unit)
        if view is None:
            return False
        observe.anomaly(view["kind"])
        log.warning(
            "anomaly detected",
            event_id=view["id"],
            tenant=view["tenant"],
            kind=view["kind"],
            feature=view["subject"].get(FEATURE),
            action=view["action"],
            detail=view["message"],
        )
        return True


def _baseline(raw: bytes | None) -> Baseline:
    if raw is None:
        return Baseline()
    weighted_sum, weight, intervals, at_s = json.loads(raw)
    return Baseline(float(weighted_sum), float(weight), int(intervals), float(at_s))


def _moment(epoch_ms: float) -> datetime:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC)
