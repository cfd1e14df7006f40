"""The front door in-process: bad input gets a clear 4xx in each door's dialect, and fast.

The body cap is driven at the ASGI level with a receive that could hand out 300 MB, so the test
can count exactly how much the app read before refusing. (tests/test_front_door_live.py does the
same over a socket against the API as a subprocess, and times /healthz meanwhile.)
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from api.batch_input import LineSplitter
from broker_config.settings import Settings
from db.engine import get_database
from db.models import Batch, LlmRequest
from db.tenants import create_api_key
from headrace.stack import DEFAULT_CONFIG

MSG = [{"role": "user", "content": "hello"}]
MiB = 1024 * 1024
DEEP = 100_000


def _line(cid: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": cid, "body": {"model": "fast", "messages": MSG, **body}}


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def settings(make_database_url: Callable[[str], str], redis_url: str, tmp_path: Path) -> Settings:
    config = tmp_path / "headrace.toml"
    config.write_text(DEFAULT_CONFIG.format(sim="http://127.0.0.1:9", key_env="SIM_KEY"))
    return Settings(
        database_url=make_database_url("sqlite"),
        redis_url=redis_url,
        config=config,
        max_line_bytes=256 * 1024,
    )


@pytest.fixture
def app(settings: Settings, redis: redis_lib.Redis) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def headers(settings: Settings) -> dict[str, str]:
    key = create_api_key(get_database(settings.database_url), "acme").key
    return {"Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"}


def _dialect_error(path: str, body: dict[str, Any]) -> tuple[str, str]:
    """(type, message) of an error body, checking it is in the dialect of ``path``'s door."""
    if path.startswith("/anthropic/"):
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        return body["error"]["type"], body["error"]["message"]
    assert set(body) == {"error"}, body
    if path.startswith("/openai/"):
        assert {"message", "type", "param", "code"} <= set(body["error"]), body
        return body["error"]["code"], body["error"]["message"]
    return body["error"]["type"], body["error"]["message"]


# --- the body cap -------------------------------------------------------------------------------


def _call_asgi(
    app: FastAPI, path: str, headers: dict[str, str], *, total: int, chunk: int = 64 * 1024
) -> tuple[int, dict[str, Any], int, bool]:
    """POST a body of ``total`` bytes (never allocated: one chunk handed out again and again).
    Returns (status, JSON body, bytes the app took, whether it asked for the last chunk)."""
    import anyio

    data = b"\n" * chunk  # blank lines: only the size can be wrong with it
    state = {"given": 0, "calls": 0}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        state["calls"] += 1
        assert state["calls"] <= total // chunk + 2, "read past the end of the body"
        size = min(chunk, total - state["given"])
        state["given"] += size
        return {"type": "http.request", "body": data[:size], "more_body": state["given"] < total}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    anyio.run(run)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert (b"connection", b"close") in start["headers"]
    return start["status"], json.loads(body), state["given"], state["given"] >= total


UPLOADS = [
    ("/v1/batches", "application/json"),
    ("/v1/batches", "application/jsonl"),
    ("/v1/batches", "multipart/form-data; boundary=x"),
    ("/openai/v1/files", "multipart/form-data; boundary=x"),
    ("/anthropic/v1/messages/batches", "application/json"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("path", "content_type"), UPLOADS)
def test_a_300_mb_streamed_body_is_cut_at_the_cap(
    app: FastAPI, headers: dict[str, str], path: str, content_type: str
) -> None:
    """Chunked (no Content-Length): 413 in the door's dialect once the cap is passed, after the app
    read at most the cap and one chunk of a 300 MB body, on every upload route and body kind."""
    cap = 8 * MiB
    app_settings = app.state.headrace.settings
    assert app_settings.max_batch_bytes == 200 * MiB  # the default the live test uses
    small = create_app(app_settings.model_copy(update={"max_batch_bytes": cap}))
    status, body, taken, _ = _call_asgi(
        small, path, {**headers, "content-type": content_type}, total=300 * 1000 * 1000
    )
    assert status == 413
    kind, message = _dialect_error(path, body)
    assert kind in ("request_too_large", "batch_too_large", "file_too_large"), body
    assert f"larger than {cap} bytes" in message
    assert taken <= cap + 64 * 1024 + 64 * 1024, taken


@pytest.mark.parametrize(
    "path", ["/v1/batches", "/openai/v1/files", "/anthropic/v1/messages/batches", "/openai/v1/batches"]
)
def test_a_declared_content_length_over_the_cap_is_refused_before_reading(
    app: FastAPI, headers: dict[str, str], path: str
) -> None:
    """Content-Length: 300 MB: 413 without a single byte of the body read."""
    declared = {**headers, "content-type": "application/json", "content-length": str(300 * 1000 * 1000)}
    status, body, taken, _ = _call_asgi(app, path, declared, total=300 * 1000 * 1000)
    assert status == 413 and taken == 0
    _, message = _dialect_error(path, body)
    assert "(Content-Length: 300000000)" in message


def test_routes_that_are_not_uploads_have_a_small_cap(client: TestClient, headers: dict[str, str]) -> None:
    """2 MiB to the OpenAI batch create (a few hundred bytes of JSON) is 413; so is any body sent
    to a route that takes none."""
    big = json.dumps(
        {"input_file_id": "f", "endpoint": "/v1/chat/completions", "metadata": {"x": "y" * 2 * MiB}}
    )
    response = client.post("/openai/v1/batches", content=big, headers=headers)
    assert response.status_code == 413 and "larger than 1048576 bytes" in response.json()["error"]["message"]
    response = client.post("/v1/batches/batch_x/cancel", content=b"x" * (2 * MiB), headers=headers)
    assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"


def test_a_bad_content_length_is_a_400(app: FastAPI, headers: dict[str, str]) -> None:
    status, body, taken, _ = _call_asgi(app, "/v1/batches", {**headers, "content-length": "lots"}, total=10)
    assert status == 400 and taken == 0 and body["error"]["message"] == "Content-Length is not a number"


# --- long lines ----------------------------------------------------------------------------------


def test_the_line_splitter_is_linear_in_a_line_without_newline() -> None:
    """32 MiB without a newline, fed 64 KiB at a time: was 7 s (quadratic), now milliseconds."""
    splitter = LineSplitter(64 * MiB)
    chunk = b"x" * (64 * 1024)
    started = time.perf_counter()
    for _ in range(32 * 16):
        assert splitter.feed(chunk) == []
    elapsed = time.perf_counter() - started
    assert [(n, len(raw)) for n, raw in splitter.feed(b"\n")] == [(1, 32 * MiB)]
    assert elapsed < 0.5, f"{elapsed:.2f} s"


@pytest.mark.parametrize("how", ["raw", "multipart"])
def test_a_line_over_the_cap_is_a_413_naming_it(
    client: TestClient, headers: dict[str, str], how: str
) -> None:
    """The cap (256 KiB here) is hit while the line is still arriving; the answer names line 2."""
    jsonl = (json.dumps(_line("a")) + "\n" + json.dumps(_line("b", user="x" * 300_000)) + "\n").encode()
    if how == "raw":
        response = client.post(
            "/v1/batches", content=jsonl, headers={**headers, "Content-Type": "application/jsonl"}
        )
    else:
        response = client.post("/v1/batches", files={"file": ("in.jsonl", jsonl)}, headers=headers)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "line_too_large" and error["message"] == "line 2 is longer than 262144 bytes"
    assert error["errors"][0]["line"] == 2


def test_an_openai_file_with_a_long_line_fails_its_batch_naming_the_line(
    client: TestClient, headers: dict[str, str]
) -> None:
    content = (json.dumps(_line("a")) + "\n" + json.dumps(_line("b", user="x" * 300_000)) + "\n").encode()
    upload = client.post(
        "/openai/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, headers=headers
    ).json()
    batch = client.post(
        "/openai/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=headers,
    ).json()
    assert batch["status"] == "failed"
    assert batch["errors"]["data"] == [
        {"code": "line_too_large", "line": 2, "message": "line 2 is longer than 262144 bytes", "param": None}
    ]


# --- deep nesting --------------------------------------------------------------------------------


def test_deep_json_is_a_400_naming_the_place_on_the_native_door(
    client: TestClient, headers: dict[str, str], settings: Settings
) -> None:
    """100,000 deep: as the body, inside a JSON batch's request, inside a JSONL line (raw and
    multipart); and 65 deep (json.loads copes, the ledger's json.dumps might not): all 400."""
    as_json = {**headers, "Content-Type": "application/json"}
    response = client.post("/v1/batches", content=_deep(DEEP), headers=as_json)
    assert (
        response.status_code == 400
        and response.json()["error"]["message"] == "the body must be a JSON object"
    )
    for depth in (DEEP, 65):
        body = '{"requests": [' + json.dumps(_line("a")) + ", " + _deep(depth) + "]}"
        response = client.post("/v1/batches", content=body, headers=as_json)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == "requests[1]: JSON nested deeper than 64 levels"
        jsonl = json.dumps(_line("a")) + "\n" + _deep(depth) + "\n"
        response = client.post(
            "/v1/batches", content=jsonl, headers={**headers, "Content-Type": "application/jsonl"}
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["message"] == "1 invalid request(s); first at line 2: JSON nested deeper than 64 levels"
        response = client.post("/v1/batches", files={"file": ("in.jsonl", jsonl.encode())}, headers=headers)
        assert response.status_code == 400 and response.json()["error"]["errors"][0]["line"] == 2
    deep_meta = {"requests": [_line("a")], "metadata": {"m": json.loads(_deep(70))}}
    response = client.post("/v1/batches", json=deep_meta, headers=headers)
    assert (
        response.status_code == 400 and "metadata: JSON nested deeper" in response.json()["error"]["message"]
    )
    with get_database(settings.database_url).session() as session:
        assert session.scalars(select(LlmRequest)).first() is None


def test_deep_json_is_a_400_on_the_openai_door(client: TestClient, headers: dict[str, str]) -> None:
    """The batch-create body: 400 in OpenAI's shape; a deep line in an uploaded file: the batch
    fails (OpenAI's way for bad lines) with the line named."""
    as_json = {**headers, "Content-Type": "application/json"}
    response = client.post("/openai/v1/batches", content=_deep(DEEP), headers=as_json)
    assert response.status_code == 400, response.text
    assert _dialect_error("/openai/", response.json()) == (
        "invalid_request",
        "the JSON body is nested too deeply",
    )
    content = (json.dumps(_line("a")) + "\n" + _deep(DEEP) + "\n").encode()
    upload = client.post(
        "/openai/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}, headers=headers
    ).json()
    batch = client.post(
        "/openai/v1/batches",
        json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        headers=headers,
    ).json()
    assert batch["status"] == "failed"
    assert [(e["line"], e["message"]) for e in batch["errors"]["data"]] == [
        (2, "JSON nested deeper than 64 levels")
    ]


def test_deep_json_is_a_400_on_the_anthropic_door(client: TestClient, headers: dict[str, str]) -> None:
    path = "/anthropic/v1/messages/batches"
    response = client.post(path, content=_deep(DEEP), headers=headers)
    assert response.status_code == 400
    assert _dialect_error(path, response.json()) == (
        "invalid_request_error",
        "the body must be a JSON object",
    )
    params = {"model": "fast", "max_tokens": 5, "messages": MSG}
    for depth in (DEEP, 65):
        body = (
            '{"requests": [{"custom_id": "a", "params": '
            + json.dumps(params)
            + '}, {"custom_id": "b", "params": {"model": "fast", "messages": '
            + _deep(depth)
            + "}}]}"
        )
        response = client.post(path, content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == "requests.1: JSON nested deeper than 64 levels"


# --- webhook URLs at submit time ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://example.com:99999/hook", "port '99999' is not a number from 1 to 65535"),
        ("http://100.100.100.200/latest/meta-data", "non-public address (100.100.100.200)"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped IPv6 address"),
        ("http://2130706433/", "write an IPv4 address as four decimal numbers"),
        ("http://0.0.0.0:8080/", "the unspecified address"),
    ],
)
def test_bad_webhook_urls_are_a_clear_400_on_every_door(
    client: TestClient, headers: dict[str, str], url: str, needle: str
) -> None:
    response = client.post(
        "/v1/batches", json={"requests": [_line("a")], "webhook_url": url}, headers=headers
    )
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    response = client.post(
        "/anthropic/v1/messages/batches",
        json={
            "requests": [{"custom_id": "a", "params": {"model": "fast", "max_tokens": 5, "messages": MSG}}],
            "metadata": {"headrace_webhook_url": url},
        },
        headers=headers,
    )
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    upload = client.post(
        "/openai/v1/files",
        files={"file": ("in.jsonl", io.BytesIO(json.dumps(_line("a")).encode()))},
        data={"purpose": "batch"},
        headers=headers,
    ).json()
    response = client.post(
        "/openai/v1/batches",
        json={
            "input_file_id": upload["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"headrace_webhook_url": url},
        },
        headers=headers,
    )
    assert response.status_code == 400 and needle in response.json()["error"]["message"], response.text
    with get_database(client.app.state.headrace.settings.database_url).session() as session:  # type: ignore[attr-defined]
        assert session.scalars(select(Batch)).first() is None
