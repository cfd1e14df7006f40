"""Retention on both dialects: expired files deleted, old results cleared in bounded steps, every
cost row kept, idempotent; and what each door answers for purged results and expired files."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from api.app import create_app
from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from broker_config.settings import Settings
from db.engine import Database
from db.models import Attempt, Batch, File, LlmRequest, Tenant
from db.retention import purge_expired
from db.states import Priority
from db.tenants import create_api_key
from db.types import utcnow
from headrace.stack import DEFAULT_CONFIG

DAY = timedelta(days=1)
MSG = [{"role": "user", "content": "hello"}]


def _batch(db: Database, tenant_id: str, lines: int, *, ended_days_ago: float | None) -> str:
    body = {"model": "fast", "messages": MSG}
    rows = [BatchLine(i + 1, f"c{i}", "fast", body) for i in range(lines)]
    batch = create_batch(db, BatchSpec(tenant_id, Priority.DEFAULT, None, 3600), rows, publish=False)
    now = utcnow()

    def finish(session: Any) -> None:
        requests = list(session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch.id)))
        for n, request in enumerate(requests):
            request.status = "succeeded" if n else "failed"
            request.response = {"choices": [{"message": {"content": f"answer {n}"}}]} if n else None
            request.error = None if n else {"kind": "exhausted", "message": "provider said: secret prompt"}
            request.input_tokens, request.output_tokens, request.cost_usd = 10, 5, Decimal("0.000123")
            session.add(
                Attempt(
                    request_id=request.id,
                    attempt_no=1,
                    deployment="openai-mini",
                    provider="openai",
                    model="gpt-4o-mini",
                    started_at=now,
                    ended_at=now,
                    outcome="ok" if n else "fatal",
                    error=None if n else {"status": 400},
                    input_tokens=10,
                    output_tokens=5,
                    cost_usd=Decimal("0.000123"),
                )
            )
        if ended_days_ago is not None:
            session.execute(
                update(Batch)
                .where(Batch.id == batch.id)
                .values(status="completed", ended_at=now - ended_days_ago * DAY, cost_usd=Decimal("0.000861"))
            )

    db.transact(finish)
    return batch.id


def _file(db: Database, tenant_id: str, fid: str, *, created_days_ago: float, expires_in_days: float) -> None:
    now = utcnow()
    db.transact(
        lambda session: session.add(
            File(
                id=fid,
                tenant_id=tenant_id,
                filename="in.jsonl",
                purpose="batch",
                size_bytes=3,
                created_at=now - created_days_ago * DAY,
                expires_at=now + expires_in_days * DAY,
                content=b"{}\n",
            )
        )
    )


def _ledger(db: Database) -> dict[str, Any]:
    """Every cost figure the ledger holds, to compare before and after a purge."""
    with db.session() as session:
        return {
            "attempts": [
                (a.request_id, a.attempt_no, a.outcome, a.input_tokens, a.output_tokens, a.cost_usd, a.error)
                for a in session.scalars(select(Attempt).order_by(Attempt.id))
            ],
            "requests": [
                (r.id, r.status, r.attempt_count, r.input_tokens, r.output_tokens, r.cost_usd, r.deployment)
                for r in session.scalars(select(LlmRequest).order_by(LlmRequest.id))
            ],
            "batches": [
                (b.id, b.status, b.total_count, b.succeeded_count, b.failed_count, b.cost_usd, b.ended_at)
                for b in session.scalars(select(Batch).order_by(Batch.id))
            ],
        }


def test_purge_clears_old_results_and_files_keeps_costs_in_bounded_steps(db: Database) -> None:
    """Batch ended 31 days ago: 7 requests cleared 3 per statement; 10 days ago and still open:
    untouched. Files past 30 days or past their own expiry: deleted. Costs: identical. Again: no-op."""
    create_api_key(db, "acme")
    with db.session() as session:
        tenant_id = session.scalars(select(Tenant.id)).one()
    still_open = _batch(db, tenant_id, 2, ended_days_ago=None)
    old = _batch(db, tenant_id, 7, ended_days_ago=31)
    recent = _batch(db, tenant_id, 3, ended_days_ago=10)
    _file(db, tenant_id, "file-old", created_days_ago=31, expires_in_days=400)  # past the retention
    _file(db, tenant_id, "file-short", created_days_ago=1, expires_in_days=-0.1)  # past its own expiry
    _file(db, tenant_id, "file-fresh", created_days_ago=1, expires_in_days=29)
    before = _ledger(db)

    touched: list[tuple[str, int]] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        match = re.match(r'\s*(?:UPDATE|DELETE FROM)\s+"?(\w+)', statement, re.IGNORECASE)
        if match:
            touched.append((match.group(1), cursor.rowcount))

    event.listen(db.write_engine, "after_cursor_execute", count)
    try:
        report = purge_expired(db, Settings(database_url=db.url), chunk_rows=3)
    finally:
        event.remove(db.write_engine, "after_cursor_execute", count)

    assert (report.files_deleted, report.batches_purged, report.requests_cleared) == (2, 1, 7)
    assert report.next_from_id == still_open  # the first batch not yet due
    assert touched and max(rows for _, rows in touched) <= 3, touched
    assert sorted(table for table, _ in touched) == ["files"] + ["requests"] * 3
    assert _ledger(db) == before
    with db.session() as session:
        old_rows = session.execute(
            select(LlmRequest.body, LlmRequest.response, LlmRequest.error).where(LlmRequest.batch_id == old)
        ).all()
        kept = session.execute(select(LlmRequest.response).where(LlmRequest.batch_id == recent)).all()
        files = sorted(session.scalars(select(File.id)))
    assert len(old_rows) == 7 and all(tuple(row) == ({}, None, None) for row in old_rows)
    assert sum(1 for (response,) in kept if response is not None) == 2
    assert files == ["file-fresh"]

    again = purge_expired(db, Settings(database_url=db.url), chunk_rows=3)
    assert (again.files_deleted, again.batches_purged, again.requests_cleared) == (0, 0, 0)
    resumed = purge_expired(db, Settings(database_url=db.url), from_id=report.next_from_id)
    assert (resumed.batches_purged, resumed.next_from_id) == (0, still_open)
    assert _ledger(db) == before


# --- what the doors answer -----------------------------------------------------------------------


@pytest.fixture
def client_and_settings(
    database_url: str, redis_url: str, tmp_path: Path, redis: redis_lib.Redis
) -> Iterator[tuple[TestClient, Settings]]:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    settings = Settings(database_url=database_url, redis_url=redis_url, config=config, file_retention_days=30)
    with TestClient(create_app(settings)) as client:
        yield client, settings


def test_purged_results_are_410_on_every_door_and_expired_files_404(
    client_and_settings: tuple[TestClient, Settings],
) -> None:
    """Batches that ended 31 days ago: the batch itself still reads (counts, cost), its results are
    410 Gone naming the retention, before and after the purge; an expired upload is 404."""
    client, settings = client_and_settings
    db = Database(settings.database_url)
    key = create_api_key(db, "acme").key
    headers = {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}
    line = {"custom_id": "a", "body": {"model": "fast", "messages": MSG}}
    native = client.post("/v1/batches", json={"requests": [line]}, headers=headers).json()["id"]
    upload = client.post(
        "/openai/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode())},
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
        headers=headers,
    ).json()
    assert upload["expires_at"] - upload["created_at"] == 3600  # asked for less than the retention
    openai_batch = client.post(
        "/openai/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=headers,
    ).json()["id"]
    anthropic_batch = client.post(
        "/anthropic/v1/messages/batches",
        json={
            "requests": [{"custom_id": "a", "params": {"model": "fast", "max_tokens": 5, "messages": MSG}}]
        },
        headers=headers,
    ).json()["id"]
    for path in (
        f"/v1/batches/{native}/cancel",
        f"/openai/v1/batches/{openai_batch}/cancel",
        f"/anthropic/v1/messages/batches/{anthropic_batch}/cancel",
    ):
        assert client.post(path, headers=headers).status_code == 200
    error_file = client.get(f"/openai/v1/batches/{openai_batch}", headers=headers).json()["error_file_id"]
    assert client.get(f"/openai/v1/files/{error_file}/content", headers=headers).status_code == 200
    db.transact(
        lambda session: (
            session.execute(update(Batch).values(ended_at=utcnow() - 31 * DAY))
            and session.execute(update(File).values(expires_at=utcnow() - timedelta(seconds=1)))
        )
    )

    for purged in (False, True):
        if purged:
            purge_expired(db, settings)
        response = client.get(f"/v1/batches/{native}/results", headers=headers)
        assert response.status_code == 410, response.text
        error = response.json()["error"]
        assert error["type"] == "results_purged"
        assert error["message"].startswith(
            f"the results of batch {native} were purged: results are kept 30 days"
        )
        assert client.get(f"/v1/batches/{native}", headers=headers).json()["request_counts"]["cancelled"] == 1
        for path in (f"/openai/v1/files/{error_file}/content", f"/openai/v1/files/{error_file}"):
            response = client.get(path, headers=headers)
            assert response.status_code == 410 and response.json()["error"]["code"] == "results_purged"
        response = client.get(f"/anthropic/v1/messages/batches/{anthropic_batch}/results", headers=headers)
        assert response.status_code == 410 and response.json()["error"]["type"] == "not_found_error"
        assert "kept 30 days after a batch ends" in response.json()["error"]["message"]
        assert (
            client.get(f"/anthropic/v1/messages/batches/{anthropic_batch}", headers=headers).status_code
            == 200
        )
        response = client.get(f"/openai/v1/files/{upload['id']}", headers=headers)
        assert (
            response.status_code == 404 and "deleted when they expire" in response.json()["error"]["message"]
        )
        assert client.get("/openai/v1/files", headers=headers).json()["data"] == []
    db.dispose()
