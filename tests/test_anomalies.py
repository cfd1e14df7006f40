"""Anomalies and runaway loops: a jump past the baseline raises one event per cooldown, seen by its
tenant and by an admin, told to the tenant's webhook and the operator's (signed), counted; a prompt
repeated past the limit is a loop; on_anomaly = pause holds bulk and default work until resumed."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select
from standardwebhooks import Webhook

from api.app import create_app
from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from broker_config.settings import Settings
from db.engine import Database, get_database
from db.events import EventKind, Finding, record_finding, set_on_anomaly
from db.ids import new_id
from db.migrate import downgrade, upgrade
from db.models import Batch, Budget, Event, LlmRequest, Tenant, WebhookAttempt, WebhookDelivery
from db.prompts import prompt_hash
from db.states import BatchStatus, Priority, RequestStatus
from db.tenants import create_api_key, tenant_webhook_secret
from db.types import utcnow
from headrace.stack import DEFAULT_CONFIG, EmbeddedStack
from workers.anomalies import SETTLE_S, AnomalyDetector, Baseline, Policy, judge
from workers.webhooks import WebhookSender

MINUTE = timedelta(seconds=60)
OPS_SECRET = "whsec_" + base64.b64encode(b"operator-secret-for-tests-000001").decode()


class Receiver:
    """A webhook receiver on a free loopback port that keeps every POST."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, secret: str) -> list[dict[str, Any]]:
        """Every body, verified against its Standard Webhooks signature (raises when forged)."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.calls]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        config=config,
        anomaly_interval_s=60,
        anomaly_factor=1.5,
        anomaly_min_intervals=5,
        anomaly_min_requests=10,
        anomaly_min_tokens_per_request=100,
        runaway_repeats=5,
        runaway_window_s=600,
        webhook_allow_hosts="127.0.0.1",
    )


@pytest.fixture
def db(settings: Settings) -> Database:
    return get_database(settings.database_url)


@pytest.fixture
def detector(db: Database, redis: redis_lib.Redis, settings: Settings) -> AnomalyDetector:
    return AnomalyDetector(db, redis, settings)


def _key(db: Database, tenant: str, *, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_api_key(db, tenant, admin=admin).key}"}


def _tenant_id(db: Database, name: str) -> str:
    with db.session() as session:
        found = session.scalar(select(Tenant.id).where(Tenant.name == name))
    assert found is not None
    return found


def _ended(db: Database, tenant_id: str, feature: str, at: datetime, count: int, tokens: int) -> None:
    """``count`` requests of ``feature`` accepted and ended at ``at``, ``tokens`` each, $0.001 each."""
    at_ms = int(at.timestamp() * 1000)
    with db.write() as session:
        batch = Batch(
            id=new_id("batch", at_ms),
            tenant_id=tenant_id,
            status=BatchStatus.COMPLETED,
            priority=Priority.BULK,
            created_at=at,
            expires_at=at + timedelta(days=1),
            total_count=count,
        )
        session.add(batch)
        session.flush()
        for line in range(count):
            session.add(
                LlmRequest(
                    id=new_id("req", at_ms),
                    batch_id=batch.id,
                    line_no=line + 1,
                    custom_id=f"c{line}",
                    model="fast",
                    body={},
                    tags={"feature": feature},
                    priority=Priority.BULK,
                    status=RequestStatus.SUCCEEDED,
                    attempt_count=1,
                    input_tokens=tokens - 10,
                    output_tokens=10,
                    cost_usd=Decimal("0.001"),
                    created_at=at,
                    ended_at=at,
                )
            )


def _events(db: Database) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).order_by(Event.id)))


def _judge_minutes(
    db: Database, detector: AnomalyDetector, tenant_id: str, start: datetime, tokens: list[int]
) -> None:
    """One interval per entry: 20 requests of feature search with that many tokens each, then a run."""
    for minute, per_request in enumerate(tokens):
        _ended(db, tenant_id, "search", start + minute * MINUTE + timedelta(seconds=20), 20, per_request)
        detector.run(start + (minute + 1) * MINUTE + timedelta(seconds=SETTLE_S))


def _anomalies_counted(kind: str) -> float:
    return REGISTRY.get_sample_value("headrace_anomalies_total", {"kind": kind}) or 0.0


def test_a_baseline_judges_only_after_enough_intervals_and_keeps_an_anomaly_clamped() -> None:
    policy = Policy(interval_s=60, half_life_s=3 * 3600, min_intervals=3, factor=2.0)
    baseline = Baseline()
    for minute in range(2):
        anomalous, baseline = judge(baseline, 100.0, floor=0, now_s=minute * 60, policy=policy)
        assert not anomalous
    # Not yet: two intervals seen.
    anomalous, after = judge(baseline, 1000.0, floor=0, now_s=120, policy=policy)
    assert not anomalous
    anomalous, baseline = judge(baseline, 100.0, floor=0, now_s=120, policy=policy)
    anomalous, after = judge(baseline, 1000.0, floor=0, now_s=180, policy=policy)
    assert anomalous
    # The spike counts as the threshold (200), not as itself (1000): the mean of 100,100,100,200.
    assert after.mean == pytest.approx(125.0, rel=0.01)
    # Under the floor, a tenfold jump is no anomaly.
    assert not judge(baseline, 1000.0, floor=5000, now_s=180, policy=policy)[0]


def test_tokens_per_request_doubling_raises_one_event_seen_by_its_tenant_and_admins(
    db: Database, detector: AnomalyDetector, settings: Settings, redis: redis_lib.Redis
) -> None:
    """Eight steady minutes at 300 tokens a request, then three at 600: one event (the cooldown folds
    the next two), with what was observed against what baseline; the tenant and an admin see it,
    another tenant does not; the counter counts it once."""
    acme, other, admin = _key(db, "acme"), _key(db, "other"), _key(db, "ops", admin=True)
    acme_id = _tenant_id(db, "acme")
    counted = _anomalies_counted("tokens_per_request")
    start = (utcnow() - timedelta(hours=1)).replace(second=0, microsecond=0)
    _judge_minutes(db, detector, acme_id, start, [300] * 8)
    assert _events(db) == []
    _judge_minutes(db, detector, acme_id, start + 8 * MINUTE, [600] * 3)

    events = _events(db)
    assert [(e.kind, e.subject, e.action) for e in events] == [
        ("tokens_per_request", {"feature": "search"}, "none")
    ]
    assert events[0].detail["observed"] == 600 and events[0].detail["baseline"] == pytest.approx(300)
    assert _anomalies_counted("tokens_per_request") == counted + 1

    with TestClient(create_app(settings)) as client:
        mine = client.get("/v1/events", headers=acme).json()
        assert [e["id"] for e in mine["data"]] == [events[0].id]
        assert (
            mine["data"][0]["tenant"] == "acme" and "2.0x its baseline of 300" in mine["data"][0]["message"]
        )
        assert client.get("/v1/events", headers=other).json()["data"] == []
        assert [e["id"] for e in client.get("/v1/events", headers=admin).json()["data"]] == [events[0].id]
        narrowed = client.get("/v1/events", params={"tenant": "other"}, headers=admin).json()
        assert narrowed["data"] == []
        assert client.get("/v1/events", params={"tenant": "acme"}, headers=acme).status_code == 403


def test_a_prompt_repeated_past_the_limit_is_a_loop_counted_per_tenant(
    db: Database, detector: AnomalyDetector
) -> None:
    """With K = 5: one tenant sending a prompt 6 times is a repeated_prompt event; another sending the
    same prompt 5 times is not (each tenant's count is its own), nor are sampling settings a new prompt."""
    body = {"model": "fast", "messages": [{"role": "user", "content": "summarize the page again"}]}
    looping, steady = create_api_key(db, "looping"), create_api_key(db, "steady")
    for tenant, times in ((looping.tenant_id, 6), (steady.tenant_id, 5)):
        lines = [
            BatchLine(i + 1, f"c{i}", "fast", {**body, "temperature": i / 10}, tags={"feature": "agent"})
            for i in range(times)
        ]
        create_batch(db, BatchSpec(tenant, Priority.BULK, None, 3600), lines, publish=False)
    assert detector.run(utcnow() + timedelta(seconds=SETTLE_S + 1)) == 1
    (event,) = _events(db)
    assert (event.tenant_id, event.kind) == (looping.tenant_id, EventKind.REPEATED_PROMPT)
    assert event.subject == {"feature": "agent", "prompt_hash": prompt_hash("fast", body)}
    assert event.detail["observed"] == 6 and event.detail["threshold"] == 5


def test_the_anomaly_webhook_reaches_tenant_and_operator_signed_with_their_own_secrets(
    db: Database, redis: redis_lib.Redis, settings: Settings, receivers: Callable[[], Receiver]
) -> None:
    """Two deliveries of no batch: the tenant's (signed with its secret, listed to it) and the
    operator's (signed with HEADRACE_OPS_WEBHOOK_SECRET, listed to nobody, its host allowed without
    HEADRACE_WEBHOOK_ALLOW_HOSTS naming it)."""
    tenant_hook, ops_hook = receivers(), receivers()
    tenant_url = tenant_hook.url.replace("127.0.0.1", "localhost")
    settings = settings.model_copy(
        update={
            "ops_webhook_url": ops_hook.url,
            "ops_webhook_secret": OPS_SECRET,
            "webhook_allow_hosts": "localhost",
        }
    )
    headers = _key(db, "acme")
    acme_id = _tenant_id(db, "acme")
    with db.write() as session:
        tenant = session.get(Tenant, acme_id)
        assert tenant is not None
        tenant.webhook_url = tenant_url
    body = {"model": "fast", "messages": [{"role": "user", "content": "again"}]}
    lines = [BatchLine(i + 1, f"c{i}", "fast", body) for i in range(6)]
    create_batch(db, BatchSpec(acme_id, Priority.BULK, None, 3600), lines, publish=False)
    assert AnomalyDetector(db, redis, settings).run(utcnow() + timedelta(seconds=SETTLE_S + 1)) == 1

    assert WebhookSender(db, settings).deliver_due() == 2
    (to_tenant,) = tenant_hook.events(tenant_webhook_secret(db, "acme"))
    (to_ops,) = ops_hook.events(OPS_SECRET)
    assert to_tenant == to_ops
    assert to_ops["type"] == "anomaly.detected"
    assert to_ops["data"]["tenant"] == "acme" and to_ops["data"]["kind"] == "repeated_prompt"
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook(OPS_SECRET).verify(*reversed(tenant_hook.calls[0]))  # type: ignore[arg-type]

    with TestClient(create_app(settings)) as client:
        listed = client.get("/v1/webhooks/deliveries", headers=headers).json()["data"]
    assert [(d["event_type"], d["batch_id"], d["state"], d["url"]) for d in listed] == [
        ("anomaly.detected", None, "delivered", tenant_url)
    ]
    with db.session() as session:
        states = {d.tenant_id: d.state for d in session.scalars(select(WebhookDelivery))}
    assert states == {acme_id: "delivered", None: "delivered"}


def _finding(tenant_id: str, feature: str, kind: EventKind = EventKind.SPEND_RATE) -> Finding:
    detail = {"observed": 9.0, "baseline": 1.0, "factor": 3.0, "window_s": 60}
    return Finding(tenant_id, kind, {"feature": feature}, detail)


def test_a_pause_follows_the_tenants_on_anomaly_or_a_budget_of_the_events_tag(db: Database) -> None:
    """A budget with on_anomaly = pause narrowed to feature=search pauses on an event about search,
    not on one about chat; a tenant's own on_anomaly = pause pauses on any; within the cooldown a
    second event of the same tenant, feature and kind is not recorded at all."""
    acme_id = create_api_key(db, "acme").tenant_id
    with db.write() as session:
        now = utcnow()
        session.add(
            Budget(
                id=new_id("bud"),
                tenant_id=acme_id,
                name="search",
                tag_key="feature",
                tag_value="search",
                period="month",
                limit_usd=Decimal(10),
                ladder=[],
                on_anomaly="pause",
                created_at=now,
                updated_at=now,
            )
        )

    def record(finding: Finding) -> Event | None:
        return db.transact(lambda s: record_finding(s, finding, utcnow(), cooldown_s=3600, ops_url=None))

    def paused_reason() -> str | None:
        with db.session() as session:
            tenant = session.get(Tenant, acme_id)
            assert tenant is not None
            return tenant.paused_reason if tenant.paused_at else None

    chat = record(_finding(acme_id, "chat"))
    assert chat is not None and chat.action == "none" and paused_reason() is None
    assert record(_finding(acme_id, "chat")) is None  # the cooldown
    search = record(_finding(acme_id, "search"))
    assert search is not None and search.action == "paused"
    assert f"event {search.id}; on_anomaly = pause on budget 'search'" in (paused_reason() or "")

    with db.write() as session:
        tenant = session.get(Tenant, acme_id)
        assert tenant is not None
        tenant.paused_at = tenant.paused_reason = None
    set_on_anomaly(db, "acme", "pause")
    tokens = record(_finding(acme_id, "chat", EventKind.TOKENS_PER_REQUEST))
    assert tokens is not None and tokens.action == "paused"
    assert "on_anomaly = pause on the tenant" in (paused_reason() or "")


def test_admins_set_pause_and_resume_a_tenant_through_the_api(db: Database, settings: Settings) -> None:
    tenant, admin = _key(db, "acme"), _key(db, "ops", admin=True)
    with TestClient(create_app(settings)) as client:
        assert (
            client.patch("/v1/tenants/acme", json={"on_anomaly": "pause"}, headers=tenant).status_code == 403
        )
        assert client.patch("/v1/tenants/acme", json={"on_anomaly": "stop"}, headers=admin).status_code == 400
        assert (
            client.patch("/v1/tenants/acme", json={"on_anomaly": "pause"}, headers=admin).json()["on_anomaly"]
            == "pause"
        )
        assert client.post("/v1/tenants/acme/pause", headers=admin).json()["paused"] is True
        assert (
            client.get("/v1/tenants/acme", headers=tenant).json()["paused_reason"] == "paused by an operator"
        )
        # Another tenant is not there for a tenant's key; its own needs an admin's to change.
        assert client.get("/v1/tenants/ops", headers=tenant).status_code == 404
        assert client.post("/v1/tenants/ops/resume", headers=tenant).status_code == 404
        assert client.patch("/v1/tenants/ops", headers=tenant).status_code == 404  # before its body
        assert client.post("/v1/tenants/acme/resume", headers=tenant).status_code == 403
        assert client.post("/v1/tenants/acme/resume", headers=admin).json()["paused"] is False
        assert client.post("/v1/tenants/nobody/resume", headers=admin).status_code == 404


def test_migration_0012_round_trips_on_a_populated_ledger(database_url: str) -> None:
    """Down to 0011 and up again with tenants, keys, batches and delivered webhooks in it (SQLite
    rebuilds the tables others point at): nothing is lost but the deliveries the old schema cannot
    hold (of no batch, or no tenant)."""
    db = get_database(database_url)
    tenant_id = create_api_key(db, "acme").tenant_id
    lines = [BatchLine(1, "c0", "fast", {"messages": [{"role": "user", "content": "hi"}]})]
    batch = create_batch(db, BatchSpec(tenant_id, Priority.BULK, None, 3600), lines, publish=False)
    with db.write() as session:
        for batch_id, owner in ((batch.id, tenant_id), (None, tenant_id), (None, None)):
            delivery_id = new_id("msg")
            session.add(
                WebhookDelivery(
                    id=delivery_id,
                    tenant_id=owner,
                    batch_id=batch_id,
                    event_type="batch.completed" if batch_id else "anomaly.detected",
                    url="http://127.0.0.1:9/",
                    payload={},
                    state="delivered",
                    attempts=1,
                    created_at=utcnow(),
                )
            )
            session.flush()
            session.add(
                WebhookAttempt(delivery_id=delivery_id, attempt_no=1, at=utcnow(), status=204, duration_ms=1)
            )
    db.dispose()
    downgrade(database_url, "0011")
    upgrade(database_url)
    db = get_database(database_url)
    with db.session() as session:
        kept = list(session.scalars(select(WebhookDelivery)))
        assert [(d.batch_id, d.tenant_id) for d in kept] == [(batch.id, tenant_id)]
        assert len(list(session.scalars(select(WebhookAttempt)))) == 1
        tenant = session.get(Tenant, tenant_id)
        assert tenant is not None and tenant.on_anomaly == "none" and tenant.paused_at is None
        request = session.scalars(select(LlmRequest)).one()
        assert request.prompt_hash is None  # kept at accept from now on; older rows have none


# --- The whole pool --------------------------------------------------------------------------------


def _wait(check: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout_s}s")


def _batch(http: httpx.Client, priority: str, prompts: list[str], feature: str) -> str:
    lines = [
        {"custom_id": f"c{i}", "body": {"model": "fast", "messages": [{"role": "user", "content": text}]}}
        for i, text in enumerate(prompts)
    ]
    response = http.post(
        "/v1/batches", json={"requests": lines, "priority": priority, "metadata": {"feature": feature}}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _status(http: httpx.Client, batch_id: str) -> str:
    return str(http.get(f"/v1/batches/{batch_id}").json()["status"])


@pytest.mark.slow
# PostgreSQL, as production runs it (the hold itself is run on both in test_budget_ladder_runs).
@pytest.mark.parametrize("dialect", ["postgresql"])
def test_a_loop_pauses_its_tenant_bulk_work_waits_interactive_runs_and_resume_lets_it_finish(
    dialect: str,
    tmp_path: Path,
    postgres_server: str | None,
    receivers: Callable[[], Receiver],
    run_cli: Callable[..., str],
) -> None:
    """A tenant with on_anomaly = pause sends one prompt 6 times (K = 5): an event, both webhooks
    signed, the worker's counter at 1, the tenant paused. Its bulk batch then waits (queued, held,
    not failed) while its interactive batch completes; `headrace tenants resume` lets the bulk batch
    complete."""
    database_url = None
    if dialect == "postgresql":
        if postgres_server is None:
            pytest.skip("no PostgreSQL available")
        from tests.conftest import _fresh_postgres_db

        database_url = _fresh_postgres_db(postgres_server)
    tenant_hook, ops_hook = receivers(), receivers()
    env = {
        "HEADRACE_ANOMALY_INTERVAL_S": "1",
        "HEADRACE_RUNAWAY_REPEATS": "5",
        "HEADRACE_HOLD_RECHECK_S": "1",
        "HEADRACE_OPS_WEBHOOK_URL": ops_hook.url,
        "HEADRACE_OPS_WEBHOOK_SECRET": OPS_SECRET,
        "HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    }
    stack = EmbeddedStack(
        tmp_path / "stack",
        database_url=database_url,
        worker_concurrency=4,
        simulator_args=("--latency-ms", "10"),
        extra_env=env,
    )
    try:
        stack.start()
        cli_env = stack.env
        run_cli("keys", "webhook", "--tenant", "demo", "--url", tenant_hook.url, env=cli_env)
        assert (
            json.loads(run_cli("tenants", "set", "demo", "--on-anomaly", "pause", env=cli_env))["on_anomaly"]
            == "pause"
        )
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=30) as http:
            # Interactive: never held, so the loop's own batch ends whenever the pause comes.
            loop = _batch(http, "interactive", ["do it again"] * 6, "agent")
            (event,) = _wait(lambda: http.get("/v1/events").json()["data"], "an event")
            assert (event["kind"], event["action"], event["subject"]["feature"]) == (
                "repeated_prompt",
                "paused",
                "agent",
            )
            assert http.get("/v1/tenants/demo").json()["paused"] is True
            _wait(lambda: _status(http, loop) == "completed", "the loop's batch")

            held = _batch(http, "bulk", [f"bulk {i} {secrets.token_hex(4)}" for i in range(3)], "report")
            live = _batch(http, "interactive", [f"live {i} {secrets.token_hex(4)}" for i in range(3)], "chat")
            _wait(lambda: _status(http, live) == "completed", "the interactive batch")
            ledger = get_database(cli_env["HEADRACE_DATABASE_URL"])

            def held_requests() -> list[LlmRequest]:
                with ledger.session() as session:
                    rows = session.scalars(select(LlmRequest).where(LlmRequest.batch_id == held))
                    return [r for r in rows if r.error and r.error.get("kind") == "tenant_paused"]

            waiting = _wait(lambda: len(held_requests()) == 3 and held_requests(), "held requests")
            assert {r.status for r in waiting} == {RequestStatus.QUEUED}
            assert "headrace tenants resume demo" in waiting[0].error["message"]  # type: ignore[index]
            time.sleep(2)  # rechecked at least once: still held
            assert _status(http, held) == "in_progress"

            assert json.loads(run_cli("tenants", "resume", "demo", env=cli_env))["paused"] is False
            _wait(lambda: _status(http, held) == "completed", "the held batch after resume", timeout_s=30)
            counts = http.get(f"/v1/batches/{held}").json()["request_counts"]
            assert counts["completed"] == 3 and counts["failed"] == 0

        _wait(lambda: tenant_hook.calls and ops_hook.calls, "both webhooks")
        secret = run_cli("keys", "secret", "--tenant", "demo", env=cli_env).strip()
        anomalies = [e for e in tenant_hook.events(secret) if e["type"] == "anomaly.detected"]
        assert [e["data"]["id"] for e in anomalies] == [event["id"]]  # besides its batches' ends
        assert [e["data"]["id"] for e in ops_hook.events(OPS_SECRET)] == [event["id"]]
        metrics = "".join(httpx.get(url).text for url in stack.worker_metrics_urls.values())
        assert 'headrace_anomalies_total{kind="repeated_prompt"} 1.0' in metrics
    finally:
        stack.stop()
