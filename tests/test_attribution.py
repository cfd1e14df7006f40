"""Attribution tags and admin keys, in-process on both databases: each front door stores a request's
tags (the batch's metadata, overridden by the line's own), workers attribute spend by them, and
an admin-only route refuses a tenant's key."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from api.app import create_app
from api.batch_input import BatchLine
from api.batch_service import BatchSpec, create_batch
from api.context import AdminCaller, CurrentCaller, CurrentTenant
from broker_config.celery_app import configure
from broker_config.settings import Settings
from db.attribution import MAX_TAG_CHARS, attribution_tags, lenient_tags
from db.engine import Database, get_database
from db.models import Batch, LlmRequest
from db.states import Priority
from db.tenants import create_api_key
from headrace.stack import DEFAULT_CONFIG
from workers import ledger, lost_calls, observe

MSG = [{"role": "user", "content": "hello"}]
BODY = {"model": "fast", "messages": MSG}


def _line(cid: str, metadata: object = None) -> dict[str, Any]:
    line: dict[str, Any] = {"custom_id": cid, "body": BODY}
    if metadata is not None:
        line["metadata"] = metadata
    return line


def _settings(database_url: str, redis_url: str, tmp_path: Path, **extra: Any) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(database_url=database_url, redis_url=redis_url, config=config, **extra)


@pytest.fixture
def settings(database_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return _settings(database_url, redis_url, tmp_path)


def _client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def client(settings: Settings, redis: redis_lib.Redis) -> Iterator[TestClient]:
    yield from _client(settings)


def _auth(settings: Settings, tenant: str = "acme", *, admin: bool = False) -> dict[str, str]:
    key = create_api_key(get_database(settings.database_url), tenant, admin=admin).key
    return {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}


def _tags(settings: Settings, batch_id: str) -> dict[str, dict[str, str] | None]:
    with get_database(settings.database_url).session() as session:
        rows = session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id))
        return {r.custom_id: r.tags for r in rows}


# --- the native door ------------------------------------------------------------------------------


def test_native_json_tags_come_from_the_batch_and_each_line_overrides_them(
    client: TestClient, settings: Settings
) -> None:
    """feature and user are kept (stringified), a line's own value wins, other keys are not tags,
    and the batch's metadata is stored whole as before."""
    metadata = {"feature": "search", "user": 7, "team": "core"}
    lines = [
        _line("a"),
        _line("b", {"user": "u-2", "note": {"free": "form"}}),
        _line("c", {"feature": True}),
    ]
    response = client.post(
        "/v1/batches", json={"requests": lines, "metadata": metadata}, headers=_auth(settings)
    )
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata
    assert _tags(settings, response.json()["id"]) == {
        "a": {"feature": "search", "user": "7"},
        "b": {"feature": "search", "user": "u-2"},
        "c": {"feature": "true", "user": "7"},
    }


def test_native_jsonl_upload_carries_line_metadata(client: TestClient, settings: Settings) -> None:
    """A raw JSONL body: per-line metadata, batch metadata from the query string."""
    content = "\n".join(
        json.dumps(line) for line in [_line("a"), _line("b", {"feature": "chat", "user": 1.5})]
    )
    response = client.post(
        "/v1/batches",
        content=content,
        params={"metadata": json.dumps({"feature": "search"})},
        headers={**_auth(settings), "Content-Type": "application/jsonl"},
    )
    assert response.status_code == 201, response.text
    assert _tags(settings, response.json()["id"]) == {
        "a": {"feature": "search"},
        "b": {"feature": "chat", "user": "1.5"},
    }


@pytest.mark.parametrize(
    ("metadata", "param", "message"),
    [
        ("search", "metadata", "metadata must be a JSON object, not a string"),
        (
            {"feature": ["a"]},
            "metadata.feature",
            "metadata.feature: a tag must be a string, number or boolean",
        ),
        ({"user": {"id": 1}}, "metadata.user", "not an object"),
        ({"user": "x" * (MAX_TAG_CHARS + 1)}, "metadata.user", f"at most {MAX_TAG_CHARS} characters"),
        ({"headrace_cache": "always"}, "metadata.headrace_cache", "must be one of on, off, refresh"),
    ],
)
def test_a_bad_line_metadata_is_reported_with_its_line_and_custom_id(
    client: TestClient, settings: Settings, metadata: object, param: str, message: str
) -> None:
    """Like any bad line on the native door: the batch is refused (400) and the line named."""
    lines = [_line("a"), _line("b", metadata), _line("c")]
    response = client.post("/v1/batches", json={"requests": lines}, headers=_auth(settings))
    assert response.status_code == 400, response.text
    [error] = response.json()["error"]["errors"]
    assert (error["line"], error["custom_id"], error["param"]) == (2, "b", param)
    assert message in error["message"]


def test_a_bad_batch_metadata_tag_is_a_400_naming_it(client: TestClient, settings: Settings) -> None:
    for metadata, message in [
        ({"feature": {"x": 1}}, "metadata.feature: a tag must be a string, number or boolean"),
        ([1], "metadata: Input should be a valid dictionary"),
        ({"headrace_cache": True}, "metadata.headrace_cache: must be one of on, off, refresh"),
    ]:
        body = {"requests": [_line("a")], "metadata": metadata}
        response = client.post("/v1/batches", json=body, headers=_auth(settings))
        assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_attribution_keys_choose_which_metadata_keys_are_tags(
    database_url: str,
    redis_url: str,
    tmp_path: Path,
    redis: redis_lib.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """HEADRACE_ATTRIBUTION_KEYS=team,cost-centre: those are kept, feature and user are not."""
    monkeypatch.setenv("HEADRACE_ATTRIBUTION_KEYS", " team , cost-centre ,")
    settings = _settings(database_url, redis_url, tmp_path)
    assert settings.attribution_tags == ("team", "cost-centre")
    assert settings.metric_tags == ()  # the default "feature" is no longer a tag
    lines = [_line("a", {"cost-centre": 42, "feature": ["not", "checked"]})]
    body = {"requests": lines, "metadata": {"team": "core", "feature": "search", "user": "u"}}
    for client in _client(settings):
        response = client.post("/v1/batches", json=body, headers=_auth(settings))
        assert response.status_code == 201, response.text
        assert _tags(settings, response.json()["id"]) == {"a": {"team": "core", "cost-centre": "42"}}


def test_metric_tag_keys_must_be_attribution_keys() -> None:
    with pytest.raises(ValueError, match="must be among the attribution keys"):
        Settings(attribution_keys="team", metric_tag_keys="feature")
    assert Settings(attribution_keys="team,feature", metric_tag_keys="feature").metric_tags == ("feature",)


# --- the OpenAI-compatible door ----------------------------------------------------------------


def _openai_batch(
    client: TestClient, headers: dict[str, str], lines: list[dict[str, Any]], **meta: str
) -> Any:
    content = "".join(
        json.dumps({**line, "method": "POST", "url": "/v1/chat/completions"}) + "\n" for line in lines
    )
    upload = client.post(
        "/openai/v1/files",
        files={"file": ("in.jsonl", io.BytesIO(content.encode()))},
        data={"purpose": "batch"},
        headers=headers,
    )
    assert upload.status_code == 200, upload.text
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": meta or None,
    }
    return client.post("/openai/v1/batches", json=body, headers=headers)


def test_openai_batch_metadata_and_line_metadata_become_tags(client: TestClient, settings: Settings) -> None:
    headers = _auth(settings)
    response = _openai_batch(
        client, headers, [_line("a"), _line("b", {"user": "u-9"})], feature="search", user="u-1", other="x"
    )
    assert response.status_code == 200 and response.json()["status"] != "failed", response.text
    assert _tags(settings, response.json()["id"]) == {
        "a": {"feature": "search", "user": "u-1"},
        "b": {"feature": "search", "user": "u-9"},
    }


def test_openai_a_bad_line_metadata_fails_the_batch_with_its_line(
    client: TestClient, settings: Settings
) -> None:
    """As OpenAI reports a bad input line: the batch is created failed, the line located."""
    response = _openai_batch(
        client, _auth(settings), [_line("a"), _line("b", {"feature": None, "user": [1]})]
    )
    batch = response.json()
    assert response.status_code == 200 and batch["status"] == "failed", response.text
    [error] = batch["errors"]["data"]
    assert error["line"] == 2 and error["param"] == "metadata.user"
    assert "a tag must be a string, number or boolean" in error["message"]


# --- the Anthropic-compatible door -----------------------------------------------------------------


def _anthropic_request(cid: str, metadata: object = None) -> dict[str, Any]:
    params = {"model": "fast", "max_tokens": 10, "messages": MSG, "metadata": {"user_id": "provider-side"}}
    request: dict[str, Any] = {"custom_id": cid, "params": params}
    if metadata is not None:
        request["metadata"] = metadata
    return request


def test_anthropic_top_level_and_request_metadata_become_tags(client: TestClient, settings: Settings) -> None:
    """params.metadata is Anthropic's own (sent on to the provider), never a tag; a bad request
    metadata makes that request errored and the rest run."""
    requests = [
        _anthropic_request("a"),
        _anthropic_request("b", {"feature": "chat", "user": False}),
        _anthropic_request("c", {"user": ["x"]}),
        _anthropic_request("d", "not-an-object"),
    ]
    body = {"requests": requests, "metadata": {"feature": "search", "headrace_priority": "bulk"}}
    response = client.post("/anthropic/v1/messages/batches", json=body, headers=_auth(settings))
    assert response.status_code == 200, response.text
    batch_id = response.json()["id"]
    assert _tags(settings, batch_id) == {
        "a": {"feature": "search"},
        "b": {"feature": "chat", "user": "false"},
        "c": {"feature": "search"},
        "d": {"feature": "search"},
    }
    with get_database(settings.database_url).session() as session:
        rows = {
            r.custom_id: r for r in session.scalars(select(LlmRequest).where(LlmRequest.batch_id == batch_id))
        }
    assert rows["a"].error is None and rows["a"].body["user"] == "provider-side"
    assert rows["c"].error is not None and rows["c"].error["message"].startswith(
        "metadata.user: a tag must be"
    )
    assert rows["d"].error == {"kind": "invalid_request", "message": "metadata: must be an object"}


def test_anthropic_top_level_metadata_must_be_an_object(client: TestClient, settings: Settings) -> None:
    body = {"requests": [_anthropic_request("a")], "metadata": "search"}
    response = client.post("/anthropic/v1/messages/batches", json=body, headers=_auth(settings))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {
        "type": "invalid_request_error",
        "message": "metadata: must be an object",
    }


# --- workers --------------------------------------------------------------------------------------

CLAIM = lost_calls.Claim(estimate_lost=lambda *_: (100, Decimal("0.5")), max_deliveries=8)


@pytest.fixture
def _dead_broker() -> None:
    configure(Settings(redis_url="redis://127.0.0.1:1/0"))


@pytest.mark.usefixtures("_dead_broker")
def test_a_run_is_attributed_by_its_requests_tags_or_for_old_rows_its_batchs_metadata(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RunStart.tags, on the usual path and the general one (a redelivery with lost calls, whose
    Spent carries the same tags); a row without tags (before 0008) falls back to the batch's."""
    tenant = create_api_key(db, "acme").tenant_id
    spec = BatchSpec(
        tenant, Priority.BULK, {"feature": "search", "team": "x"}, 3600, tags={"feature": "search"}
    )
    lines = [BatchLine(1, "a", "fast", BODY, tags={"user": "u1"}), BatchLine(2, "b", "fast", BODY)]
    batch = create_batch(db, spec, lines)
    with db.session() as session:
        ids = list(
            session.scalars(
                select(LlmRequest.id).where(LlmRequest.batch_id == batch.id).order_by(LlmRequest.line_no)
            )
        )
    db.transact(lambda s: s.execute(update(LlmRequest).where(LlmRequest.id == ids[1]).values(tags=None)))

    first = ledger.begin_run(db, ids[0], "L1", CLAIM)
    assert first is not None and first.tags == {"feature": "search", "user": "u1"}
    old = ledger.begin_run(db, ids[1], "L1", CLAIM)
    assert old is not None and old.tags == {"feature": "search"}  # "team" is not an attribution key

    # The run dies mid-call; the next run takes the general path and costs the call as lost.
    attempt = ledger.begin_attempt(
        db, ids[0], "L1", deployment="d1", provider="openai", model="m", estimated_input_tokens=10, worker="w"
    )
    assert attempt == 1
    spent: list[Any] = []
    monkeypatch.setattr(observe, "lost_calls", spent.extend)
    again = ledger.begin_run(db, ids[0], "L2", CLAIM)
    assert again is not None and again.tags == {"feature": "search", "user": "u1"}
    assert [s.tags for s in spent] == [{"feature": "search", "user": "u1"}]
    with db.session() as session:
        assert session.get(Batch, batch.id).metadata_ == {"feature": "search", "team": "x"}  # type: ignore[union-attr]


def test_lenient_tags_skip_what_the_door_would_refuse() -> None:
    metadata = {"feature": {"nested": 1}, "user": 3, "team": "t"}
    assert lenient_tags(metadata, ("feature", "user")) == {"user": "3"}
    assert attribution_tags({"feature": None, "user": "u"}, ("feature", "user")) == {"user": "u"}


# --- admin keys -----------------------------------------------------------------------------------


@pytest.fixture
def admin_app(settings: Settings, redis: redis_lib.Redis) -> Iterator[TestClient]:
    """The real app plus one admin-only route and one that reports who called."""
    app: FastAPI = create_app(settings)

    @app.get("/v1/test-admin")
    def admin_only(caller: AdminCaller) -> dict[str, Any]:
        return {"tenant": caller.tenant.name, "admin": caller.admin}

    @app.get("/v1/test-caller")
    def who(caller: CurrentCaller, tenant: CurrentTenant) -> dict[str, Any]:
        return {"tenant": tenant.name, "admin": caller.admin, "same": caller.tenant.id == tenant.id}

    with TestClient(app) as test_client:
        yield test_client


def test_an_admin_route_refuses_a_tenant_key_and_takes_an_admin_key(
    admin_app: TestClient, settings: Settings
) -> None:
    tenant, admin = _auth(settings, "acme"), _auth(settings, "ops", admin=True)
    refused = admin_app.get("/v1/test-admin", headers=tenant)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "permission_error"
    assert "needs an admin key" in refused.json()["error"]["message"]
    assert admin_app.get("/v1/test-admin").status_code == 401
    assert admin_app.get("/v1/test-admin", headers=admin).json() == {"tenant": "ops", "admin": True}
    assert admin_app.get("/v1/test-caller", headers=tenant).json() == {
        "tenant": "acme",
        "admin": False,
        "same": True,
    }
    # An admin key is still its tenant's key on the ordinary routes.
    assert admin_app.get("/v1/batches", headers=admin).status_code == 200


def test_current_tenant_and_current_caller_share_one_key_lookup(
    admin_app: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.context

    calls: list[str] = []
    real = api.context.tenant_for_key

    def counting(session: Any, key: str) -> Any:
        calls.append(key)
        return real(session, key)

    monkeypatch.setattr(api.context, "tenant_for_key", counting)
    assert admin_app.get("/v1/test-caller", headers=_auth(settings)).status_code == 200
    assert len(calls) == 1
