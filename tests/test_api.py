"""The native API in-process (real app, real Redis, both databases): auth, bad input, lists, results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.batch_service import BatchLine, BatchSpec, create_batch
from broker_config.settings import Settings
from db.engine import get_database
from db.models import LlmRequest
from db.tenants import create_api_key
from headrace.stack import DEFAULT_CONFIG

MSG = [{"role": "user", "content": "hello"}]


def _line(cid: object, model: str = "fast", **extra: object) -> dict[str, object]:
    return {"custom_id": cid, "body": {"model": model, "messages": MSG, **extra}}


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(database_url=database_url, redis_url=redis_url, config=config, max_batch_lines=5)


@pytest.fixture
def client(settings: Settings, redis: redis_lib.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _auth(settings: Settings, tenant: str = "acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {create_api_key(get_database(settings.database_url), tenant).key}"}


def _error(response: object) -> dict[str, object]:
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}, body
    return body["error"]  # type: ignore[no-any-return]


def test_requests_without_a_valid_key_are_refused(client: TestClient) -> None:
    """No key, or a wrong one: 401 with a JSON error that says which."""
    assert _error(client.get("/v1/batches"))["message"].startswith("missing API key")
    response = client.get("/v1/batches", headers={"Authorization": "Bearer hr_wrong"})
    assert response.status_code == 401 and _error(response)["type"] == "authentication_error"


def test_a_json_batch_is_persisted_and_published_to_its_priority_queue(
    client: TestClient, settings: Settings, redis: redis_lib.Redis
) -> None:
    """201 with the batch; each request is in the ledger, marked published, and queued in Redis."""
    body = {"requests": [_line("a"), _line("b", "smart")], "priority": "interactive", "metadata": {"k": "v"}}
    response = client.post("/v1/batches", json=body, headers=_auth(settings))
    assert response.status_code == 201, response.text
    batch = response.json()
    assert batch["status"] == "in_progress" and batch["priority"] == "interactive"
    assert batch["request_counts"] == {
        "total": 2,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
        "expired": 0,
        "in_progress": 2,
    }
    assert batch["metadata"] == {"k": "v"} and batch["cost_usd"] == "0"
    with get_database(settings.database_url).session() as session:
        rows = list(session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch["id"])))
    assert sorted(r.custom_id for r in rows) == ["a", "b"] and all(r.published_at for r in rows)
    assert redis.llen("interactive") == 2  # priority 0 lives in the bare list


def test_a_jsonl_upload_is_accepted_raw_or_multipart(client: TestClient, settings: Settings) -> None:
    """The same lines as a raw application/jsonl body or as a multipart file field."""
    jsonl = "\n".join(json.dumps(_line(f"r{i}")) for i in range(3)) + "\n\n"
    headers = _auth(settings)
    raw = client.post(
        "/v1/batches?priority=bulk", content=jsonl, headers={**headers, "Content-Type": "application/jsonl"}
    )
    assert raw.status_code == 201 and raw.json()["request_counts"]["total"] == 3
    assert raw.json()["priority"] == "bulk"
    multipart = client.post(
        "/v1/batches",
        files={"file": ("in.jsonl", jsonl.encode())},
        data={"priority": "interactive", "metadata": '{"team": "search"}'},
        headers=headers,
    )
    assert multipart.status_code == 201, multipart.text
    assert multipart.json()["metadata"] == {"team": "search"}


@pytest.mark.parametrize(
    ("lines", "status", "needle", "where"),
    [
        (
            [_line("a", "nope")],
            400,
            "unknown route 'nope'",
            {"line": 1, "custom_id": "a", "param": "body.model"},
        ),
        ([{"body": {"model": "fast", "messages": MSG}}], 400, "custom_id is missing", {"line": 1}),
        (
            [_line("a"), _line("b"), _line("a")],
            400,
            "duplicate custom_id 'a' (first at line 1)",
            {"line": 3, "custom_id": "a"},
        ),
        (
            [{"custom_id": "a", "body": "text"}],
            400,
            "body must be a JSON object",
            {"line": 1, "param": "body"},
        ),
        ([_line("a", stream=True)], 400, "streaming", {"line": 1, "param": "body.stream"}),
        ([], 400, "the batch has no requests", None),
        ([_line(f"r{i}") for i in range(6)], 413, "at most 5 requests", None),
    ],
    ids=[
        "unknown-route",
        "missing-custom-id",
        "duplicate-custom-id",
        "body-not-object",
        "stream",
        "empty",
        "over-max",
    ],
)
def test_bad_jsonl_is_refused_with_where_and_what(
    client: TestClient,
    settings: Settings,
    lines: list[object],
    status: int,
    needle: str,
    where: dict[str, object] | None,
) -> None:
    """Each kind of bad input: a 4xx JSON error naming what is wrong and on which line."""
    jsonl = "".join(json.dumps(line) + "\n" for line in lines)
    response = client.post(
        "/v1/batches", content=jsonl, headers={**_auth(settings), "Content-Type": "application/jsonl"}
    )
    assert response.status_code == status, response.text
    error = _error(response)
    assert needle in error["message"]
    if where is not None:
        assert any(where.items() <= item.items() for item in error["errors"]), error["errors"]
    with get_database(settings.database_url).session() as session:
        assert session.scalars(select(LlmRequest)).first() is None  # nothing half-accepted


def test_malformed_jsonl_names_the_line(client: TestClient, settings: Settings) -> None:
    """A line that is not JSON is reported with its number, along with every other bad line."""
    jsonl = json.dumps(_line("a")) + "\n{not json\n" + json.dumps(_line("c", "nope")) + "\n"
    response = client.post(
        "/v1/batches", content=jsonl, headers={**_auth(settings), "Content-Type": "application/x-ndjson"}
    )
    error = _error(response)
    assert response.status_code == 400 and error["message"].startswith(
        "2 invalid request(s); first at line 2"
    )
    assert [e["line"] for e in error["errors"]] == [2, 3]


def test_bad_json_batches_name_the_request_index(client: TestClient, settings: Settings) -> None:
    """In a JSON body, positions are requests[i]; a wrong priority or non-array is a clear 400."""
    headers = _auth(settings)
    response = client.post("/v1/batches", json={"requests": [_line("a"), _line("b", "zzz")]}, headers=headers)
    assert "first at requests[1]: unknown route 'zzz'" in _error(response)["message"]
    response = client.post(
        "/v1/batches", json={"requests": [_line("a")], "priority": "urgent"}, headers=headers
    )
    assert response.status_code == 400 and "priority" in _error(response)["message"]
    response = client.post(
        "/v1/batches", content=b"{oops", headers={**headers, "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and _error(response)["type"] == "invalid_request"
    response = client.post("/v1/batches", content=b"x", headers={**headers, "Content-Type": "text/csv"})
    assert response.status_code == 415


def test_tenants_see_only_their_own_batches(client: TestClient, settings: Settings) -> None:
    """Another tenant's batch is a 404 and absent from the list, whatever its id."""
    mine, theirs = _auth(settings, "acme"), _auth(settings, "globex")
    batch_id = client.post("/v1/batches", json={"requests": [_line("a")]}, headers=mine).json()["id"]
    assert client.get(f"/v1/batches/{batch_id}", headers=mine).status_code == 200
    assert client.get(f"/v1/batches/{batch_id}", headers=theirs).status_code == 404
    assert client.get(f"/v1/batches/{batch_id}/results", headers=theirs).status_code == 404
    assert client.get("/v1/batches", headers=theirs).json()["data"] == []


def test_batches_list_newest_first_with_cursor_pages(client: TestClient, settings: Settings) -> None:
    """limit/after walk every batch once, newest first; has_more is false on the last page."""
    headers = _auth(settings)
    created = [
        client.post("/v1/batches", json={"requests": [_line("a")]}, headers=headers).json()["id"]
        for _ in range(5)
    ]
    seen, after = [], None
    while True:
        page = client.get(
            "/v1/batches", params={"limit": 2, **({"after": after} if after else {})}, headers=headers
        ).json()
        seen += [b["id"] for b in page["data"]]
        assert page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == sorted(created, reverse=True)


def test_results_stream_one_line_per_request_in_input_order(client: TestClient, settings: Settings) -> None:
    """Before any worker runs, every request has a line: its custom_id and status queued."""
    headers = _auth(settings)
    batch_id = client.post(
        "/v1/batches", json={"requests": [_line("x"), _line("y")]}, headers=headers
    ).json()["id"]
    response = client.get(f"/v1/batches/{batch_id}/results", headers=headers)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.headers["content-type"].startswith("application/jsonl")
    assert [(r["custom_id"], r["status"], r["response"]) for r in lines] == [
        ("x", "queued", None),
        ("y", "queued", None),
    ]


def test_health_and_readiness(client: TestClient, redis: redis_lib.Redis) -> None:
    """/healthz always answers; /readyz checks the database and Redis, and warns while the answer
    cache's Redis (here the broker's server, db + 1) would never evict."""
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}
    assert "noeviction" in ready.json()["warnings"]["cache_redis"]
    redis.config_set("maxmemory-policy", "allkeys-lru")
    try:
        assert client.get("/readyz").json()["warnings"] == {}
    finally:
        redis.config_set("maxmemory-policy", "noeviction")


def test_redis_down_the_batch_is_still_accepted_and_readyz_says_so(settings: Settings) -> None:
    """Broker unreachable: 201 (the work is persisted, unpublished, for the sweep); /readyz is 503."""
    down = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        response = client.post("/v1/batches", json={"requests": [_line("a")]}, headers=_auth(settings))
        assert response.status_code == 201
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
    with get_database(settings.database_url).session() as session:
        row = session.scalars(select(LlmRequest).where(LlmRequest.batch_id == response.json()["id"])).one()
    assert row.published_at is None


def test_the_publisher_sweep_leaves_a_batch_alone_while_its_publisher_holds_it(
    settings: Settings, redis: redis_lib.Redis
) -> None:
    """A large batch is published after its answer, which can outlast the sweep's grace: the
    sweep published 90% of a 100,000-request batch a second time while the API was still at it
    (bench/pipeline.py on PostgreSQL). While the publisher holds the batch's claim the sweep skips
    it; once released (or expired: a publisher that died) the sweep publishes what is left."""
    from broker_config.celery_app import configure
    from db.outbox import publishing
    from db.states import Priority
    from workers.housekeeping import sweep_unpublished

    configure(settings)
    db = get_database(settings.database_url)
    tenant = create_api_key(db, "acme").tenant_id
    body = {"model": "fast", "messages": MSG}
    lines = [BatchLine(i + 1, f"p{i}", "fast", body) for i in range(30)]
    batch = create_batch(db, BatchSpec(tenant, Priority.DEFAULT, None, 3600), lines, publish=False)
    create_batch(db, BatchSpec(tenant, Priority.BULK, None, 3600), lines[:5], publish=False)
    now = settings.model_copy(update={"publish_grace_s": 0})
    with publishing(redis, batch.id):
        assert sweep_unpublished(db, now, redis) == 5  # only the other batch
        assert redis.llen("default\x06\x163") == 0 and redis.llen("bulk\x06\x169") == 5
    assert sweep_unpublished(db, now, redis) == 30
    assert redis.llen("default\x06\x163") == 30
    with db.session() as session:
        assert all(r.published_at for r in session.scalars(select(LlmRequest)))
    assert not redis.exists(f"headrace:publishing:{batch.id}")


def test_a_large_batch_is_answered_once_committed_and_published_right_after(
    settings: Settings, redis: redis_lib.Redis
) -> None:
    """Over 2,000 lines the 201 comes once everything is committed; every request is published
    just after (here, before the test client returns), none twice."""
    big = settings.model_copy(update={"max_batch_lines": 5000})
    jsonl = "".join(json.dumps(_line(f"r{i}")) + "\n" for i in range(2500))
    with TestClient(create_app(big)) as client:
        response = client.post(
            "/v1/batches?priority=bulk",
            content=jsonl,
            headers={**_auth(big), "Content-Type": "application/jsonl"},
        )
    assert response.status_code == 201 and response.json()["request_counts"]["total"] == 2500
    assert redis.llen("bulk\x06\x169") == 2500
    with get_database(big.database_url).session() as session:
        assert all(r.published_at for r in session.scalars(select(LlmRequest)))
