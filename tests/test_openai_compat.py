"""The OpenAI Batch and Files APIs, driven by the official `openai` SDK exactly as users would,
with Headrace behind them and the simulator behind Headrace; plus cancel, expiry and webhooks."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from openai.types import Batch
from openai.types.chat import ChatCompletion
from standardwebhooks import Webhook

from db.engine import get_database
from db.models import Batch as BatchRow
from headrace.embedded import free_port
from headrace.stack import EmbeddedStack

ENDED = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("openai-compat"),
        worker_concurrency=4,
        simulator_args=("--latency-ms", "30"),
        extra_env={
            "HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            "HEADRACE_WEBHOOK_RETRY_SCHEDULE_S": "0.3,0.3,0.3",
        },
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def client(stack: EmbeddedStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.api_url}/openai/v1", api_key=stack.api_key)


def jsonl(n: int, prefix: str, model: str = "fast", text: str = "Hello") -> bytes:
    return b"".join(
        json.dumps(
            {
                "custom_id": f"{prefix}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"{text} {i}"}],
                    "max_tokens": 20,
                },
            }
        ).encode()
        + b"\n"
        for i in range(n)
    )


def submit(client: openai.OpenAI, content: bytes, **metadata: str) -> Batch:
    upload = client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )


def wait(client: openai.OpenAI, batch_id: str, timeout_s: float = 90) -> Batch:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not end")


def lines_of(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_create_poll_download_with_the_official_sdk(client: openai.OpenAI, http: httpx.Client) -> None:
    """files.create -> batches.create -> retrieve until completed -> files.content: every line in
    OpenAI's output format, each body a ChatCompletion; the native API shows the same batch and cost."""
    batch = submit(client, jsonl(12, "a") + jsonl(3, "b", model="smart"), project="search")
    assert batch.status == "in_progress" and batch.request_counts and batch.request_counts.total == 15
    done = wait(client, batch.id)
    assert (
        done.status == "completed"
        and done.completed_at
        and done.output_file_id
        and done.error_file_id is None
    )
    assert done.request_counts is not None and (
        done.request_counts.completed,
        done.request_counts.failed,
    ) == (15, 0)
    assert done.metadata == {"project": "search"} and done.usage and done.usage.output_tokens > 0
    output = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(
        [f"a-{i}" for i in range(12)] + ["b-0", "b-1", "b-2"]
    )
    for line in output:
        assert (
            line["error"] is None
            and line["response"]["status_code"] == 200
            and line["id"].startswith("batch_req_")
        )
        ChatCompletion.model_validate(line["response"]["body"])
    native = http.get(f"/v1/batches/{batch.id}").json()
    assert native["status"] == "completed" and float(native["cost_usd"]) > 0
    assert client.files.retrieve(done.output_file_id).bytes == len(
        client.files.content(done.output_file_id).content
    )


def test_list_paginates_with_the_sdk(client: openai.OpenAI) -> None:
    created = [submit(client, jsonl(1, f"p{i}")).id for i in range(3)]
    seen = [b.id for b in client.batches.list(limit=2)]
    assert seen[:3] == list(reversed(created)) and len(seen) == len(set(seen))
    files = [f.id for f in client.files.list(limit=2, order="asc")]
    assert len(files) == len(set(files)) >= 3


def test_an_invalid_file_fails_the_batch_with_located_errors(client: openai.OpenAI) -> None:
    """As OpenAI does: the batch is created, then failed, with one error per bad line."""
    content = jsonl(1, "ok") + b"{not json\n" + jsonl(1, "x", model="no-such-route") + jsonl(1, "ok")
    batch = submit(client, content)
    assert batch.status == "failed" and batch.failed_at and batch.errors and batch.errors.data
    errors = [(e.line, e.code) for e in batch.errors.data]
    assert errors == [(2, "invalid_json_line"), (3, "model_not_found"), (4, "duplicate_custom_id")]


def test_bad_calls_raise_the_sdks_own_errors(client: openai.OpenAI, stack: EmbeddedStack) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    upload = client.files.create(file=("r.jsonl", io.BytesIO(jsonl(1, "e"))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="chat/completions"):
        client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{stack.api_url}/openai/v1", api_key="hr_wrong", max_retries=0).batches.list()
    assert client.files.delete(upload.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(upload.id)


def test_cancel_stops_queued_requests_and_keeps_what_finished(client: openai.OpenAI) -> None:
    """Cancelled while most requests wait: those end cancelled (error file, batch_cancelled), the
    finished ones are in the output file, and the batch ends cancelled."""
    batch = submit(client, jsonl(200, "c", text="[[sim:latency_ms=200]] slow"))
    time.sleep(0.5)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.error_file_id
    errors = lines_of(client, done.error_file_id)
    assert errors and all(e["error"]["code"] == "batch_cancelled" and e["response"] is None for e in errors)
    finished = lines_of(client, done.output_file_id) if done.output_file_id else []
    assert len(errors) + len(finished) == 200 and len(errors) > 100
    with pytest.raises(openai.BadRequestError, match="already ended"):
        client.batches.cancel(batch.id)


def test_a_batch_past_its_window_expires_with_what_finished(
    client: openai.OpenAI, stack: EmbeddedStack
) -> None:
    """Past its window, what still waits ends expired (batch_expired in the error file)."""
    batch = submit(client, jsonl(150, "x", text="[[sim:latency_ms=200]] slow"))
    time.sleep(0.5)
    with get_database(stack.env["HEADRACE_DATABASE_URL"]).write() as session:
        row = session.get(BatchRow, batch.id)
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
    done = wait(client, batch.id, timeout_s=60)
    assert done.status == "expired" and done.expired_at and done.error_file_id
    expired = lines_of(client, done.error_file_id)
    assert expired and all(e["error"]["code"] == "batch_expired" for e in expired)
    assert done.request_counts and done.request_counts.completed + len(expired) == 150


# --- webhooks ----------------------------------------------------------------------------------


class Receiver:
    """A webhook endpoint on loopback that fails the first ``failures`` deliveries of each event."""

    def __init__(self, failures: int, status: int = 500) -> None:
        self.failures, self.status = failures, status
        self.calls: list[tuple[dict[str, str], bytes]] = []
        app = FastAPI()

        @app.post("/hook")
        async def hook(request: Request) -> Response:
            self.calls.append((dict(request.headers), await request.body()))
            tries = sum(
                1 for headers, _ in self.calls if headers["webhook-id"] == request.headers["webhook-id"]
            )
            if tries <= self.failures:
                return Response(status_code=self.status, headers={"location": "http://169.254.169.254/"})
            return JSONResponse({"ok": True})

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        threading.Thread(target=self.server.run, daemon=True).start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def wait_for(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.calls) >= count, self.calls

    def stop(self) -> None:
        self.server.should_exit = True


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(failures: int = 0, status: int = 500) -> Receiver:
        made.append(Receiver(failures, status))
        return made[-1]

    yield make
    for r in made:
        r.stop()


@pytest.mark.slow
def test_a_signed_webhook_is_retried_until_it_is_taken(
    client: openai.OpenAI,
    http: httpx.Client,
    stack: EmbeddedStack,
    receiver: Callable[..., Receiver],
    run_cli: Callable[..., str],
) -> None:
    """The receiver answers 500 twice: the third POST is taken. Each carries the same webhook-id and
    a Standard Webhooks signature that verifies with the tenant's secret; all three are recorded."""
    hook = receiver(failures=2)
    batch = submit(client, jsonl(3, "w"), headrace_webhook_url=hook.url)
    hook.wait_for(3)
    secret = run_cli(
        "keys",
        "secret",
        "--tenant",
        "demo",
        env={"HEADRACE_DATABASE_URL": stack.env["HEADRACE_DATABASE_URL"]},
    ).strip()
    ids = {headers["webhook-id"] for headers, _ in hook.calls}
    assert len(ids) == 1
    headers, body = hook.calls[-1]
    event = Webhook(secret).verify(body, headers)
    assert (
        event["type"] == "batch.completed"
        and event["data"]["id"] == batch.id
        and event["data"]["api"] == "openai"
    )
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook(secret).verify(body.replace(b"completed", b"cancelled"), headers)
    deliveries = http.get("/v1/webhooks/deliveries", params={"batch_id": batch.id}).json()["data"]
    assert len(deliveries) == 1 and deliveries[0]["state"] == "delivered" and deliveries[0]["attempts"] == 3
    detail = http.get(f"/v1/webhooks/deliveries/{deliveries[0]['id']}").json()
    assert [a["status"] for a in detail["attempt_log"]] == [500, 500, 200]
    http.post(f"/v1/webhooks/deliveries/{deliveries[0]['id']}/redeliver").raise_for_status()
    hook.wait_for(4)


@pytest.mark.slow
def test_redirects_are_not_followed_and_retries_are_bounded(
    http: httpx.Client, receiver: Callable[..., Receiver]
) -> None:
    """A receiver that always redirects (to the metadata address): never followed, given up after
    the schedule's attempts, recorded as failed."""
    hook = receiver(failures=100, status=302)
    batch = http.post(
        "/v1/batches",
        json={
            "requests": [
                {"custom_id": "r", "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}}
            ],
            "webhook_url": hook.url,
        },
    ).json()
    hook.wait_for(4)
    time.sleep(1.5)
    deliveries = http.get("/v1/webhooks/deliveries", params={"batch_id": batch["id"]}).json()["data"]
    assert deliveries[0]["state"] == "failed" and deliveries[0]["attempts"] == 4
    assert "redirects are not followed" in deliveries[0]["last_error"] and len(hook.calls) == 4


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.7/hook",
        "http://[::1]:1/x",
        "http://192.168.1.5/hook",
        "file:///etc/passwd",
    ],
)
def test_webhook_urls_to_private_places_are_refused(
    url: str, http: httpx.Client, client: openai.OpenAI
) -> None:
    response = http.post(
        "/v1/batches",
        json={
            "requests": [
                {"custom_id": "r", "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]}}
            ],
            "webhook_url": url,
        },
    )
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_webhook_url"
    with pytest.raises(openai.BadRequestError):
        submit(client, jsonl(1, "s"), headrace_webhook_url=url)


def test_a_tenants_default_webhook_hears_batches_that_name_none(
    http: httpx.Client, stack: EmbeddedStack, receiver: Callable[..., Receiver], run_cli: Callable[..., str]
) -> None:
    hook = receiver()
    env = {
        "HEADRACE_DATABASE_URL": stack.env["HEADRACE_DATABASE_URL"],
        "HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
    }
    run_cli("keys", "webhook", "--tenant", "demo", "--url", hook.url, env=env)
    try:
        batch = http.post(
            "/v1/batches",
            json={
                "requests": [
                    {
                        "custom_id": "d",
                        "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
                    }
                ]
            },
        ).json()
        hook.wait_for(1)
        assert json.loads(hook.calls[0][1])["data"]["id"] == batch["id"]
    finally:
        run_cli("keys", "webhook", "--tenant", "demo", "--url", "", env=env)
    message = run_cli(
        "keys", "webhook", "--tenant", "demo", "--url", "http://10.1.1.1/x", env=env, expect_code=2
    )
    assert "non-public address" in message
