"""No log of a real stack holds a key, a prompt or a webhook's token, even when the provider's
error bodies echo the key and the prompt back (the simulator's ``--echo-in-errors``)."""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import select

from db.engine import get_database
from db.models import WebhookDelivery
from headrace.stack import SIM_KEY_ENV, EmbeddedStack
from tests.test_end_to_end import wait_ended

pytestmark = pytest.mark.slow

ROUTES = ("fast", "smart")  # both dialects: the key goes as a bearer token and as x-api-key


@dataclass
class Receiver:
    """A webhook receiver on loopback that answers 500, so that every delivery fails and is logged."""

    posts: list[str] = field(default_factory=list)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.posts.append(self.path)
                self.send_response(500)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver()
    made.start()
    yield made
    made.stop()


@dataclass
class Run:
    logs: dict[str, str]  # file name -> text, every log file of the stack
    secrets: dict[str, str]  # what must never appear, by what it is
    marker: str


def _lines(marker: str, count: int) -> list[dict[str, Any]]:
    """Half of them refused by the provider (400, echoed back); the rest meet its 500s."""
    lines = []
    for i in range(count):
        directive = " [[sim:status=400]]" if i % 2 else ""
        body = {
            "model": ROUTES[i % 4 // 2],
            "messages": [{"role": "user", "content": f"{marker} line {i}{directive}"}],
            "max_tokens": 16,
        }
        lines.append({"custom_id": f"r{i}", "body": body})
    return lines


def _run_stack(home: Path, receiver: Receiver, *, log_content: bool) -> Run:
    marker = f"PROMPTMARK{uuid.uuid4().hex}"
    token = f"hooktoken{uuid.uuid4().hex}"
    # Not shaped like any provider's key: only the lookup of the deployments' variables can catch it.
    sim_key = f"simkey{uuid.uuid4().hex}"
    port = int(receiver.server.server_address[1])
    webhook = f"http://127.0.0.1:{port}/hook/{token}?token={token}"
    env = {
        SIM_KEY_ENV: sim_key,
        "HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
        "HEADRACE_WEBHOOK_RETRY_SCHEDULE_S": "0.2",  # one retry, then failed for good (and logged)
        # DEBUG, with the SDKs and Celery at their most talkative: still nothing secret.
        "HEADRACE_LOG_LEVEL": "DEBUG",
        "HEADRACE_LOG_CONTENT": "true" if log_content else "false",
    }
    stack = EmbeddedStack(
        home,
        workers=1,
        worker_concurrency=8,
        simulator_args=(
            "--latency-ms",
            "5",
            "--fault-rate",
            "0.5",
            "--faults",
            "500,503,529",
            "--echo-in-errors",
        ),
        extra_env=env,
    )
    try:
        stack.start()
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=30) as http:
            native = http.post("/v1/batches", json={"requests": _lines(marker, 24), "webhook_url": webhook})
            assert native.status_code == 201, native.text
            # A JSONL upload names its webhook in the query string, which the access log writes down.
            jsonl = "\n".join(json.dumps(line) for line in _lines(marker, 8)).encode()
            upload = http.post(
                f"/v1/batches?webhook_url={quote(webhook, safe='')}",
                content=jsonl,
                headers={"content-type": "application/jsonl"},
            )
            assert upload.status_code == 201, upload.text
            batch_ids = [native.json()["id"], upload.json()["id"]]
            views = wait_ended(http, batch_ids, timeout_s=180)
            assert all(v["status"] == "completed" for v in views.values())
        _wait_deliveries_failed(stack)
    finally:
        stack.stop()
    secrets = {"simulator key": sim_key, "Headrace key": stack.api_key, "webhook token": token}
    logs = {p.name: p.read_text(errors="replace") for p in sorted((home / "logs").iterdir())}
    return Run(logs, secrets, marker)


def _wait_deliveries_failed(stack: EmbeddedStack) -> None:
    """Both webhooks were tried twice and given up on (their failure is logged then)."""
    db = get_database(stack.env["HEADRACE_DATABASE_URL"])
    worker = next(p for p in stack.processes if p.name == "worker1")

    def failed() -> bool:
        with db.session() as session:
            states = session.scalars(select(WebhookDelivery.state)).all()
        return len(states) == 2 and all(s == "failed" for s in states)

    worker.wait_until(failed, timeout_s=60, what="done with its webhooks")


# Celery's signal handler prints this to stdout itself, not through logging (celery/apps/worker.py).
CELERY_SHUTDOWN_PRINT = re.compile(r"^worker: (Warm|Cold) shutdown \(MainProcess\)$")


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a Headrace log, parsed: each must be a JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    return [json.loads(line) for line in lines if not CELERY_SHUTDOWN_PRINT.match(line)]


def test_no_log_holds_a_key_a_prompt_or_a_webhook_token(tmp_path: Path, receiver: Receiver) -> None:
    """Provider errors that echo the key and the prompt, webhooks that fail, DEBUG everywhere: no
    log file of the stack holds the simulator's key, the Headrace key, a prompt or the webhook's
    token; Headrace's logs are JSON lines, and a worker's failed call names its request, batch,
    deployment and attempt."""
    run = _run_stack(tmp_path / "stack", receiver, log_content=False)
    assert {"api.log", "worker1.log", "simulator.log"} <= set(run.logs)
    for name, text in run.logs.items():
        for what, secret in {**run.secrets, "prompt": run.marker}.items():
            # Half of one is a leak too (a message cut in the middle of a key).
            assert secret[: len(secret) // 2] not in text, f"{name} holds the {what}"
    # The simulator stands in for a provider: its log is uvicorn's plain text, not Headrace's.
    for name in ("api.log", "worker1.log"):
        assert _json_lines(run.logs[name]), f"{name} is empty"
    worker = _json_lines(run.logs["worker1.log"])
    failures = [e for e in worker if e["event"] == "call failed"]
    assert failures, "the provider's errors were logged"
    context = {"request_id", "batch_id", "tenant", "deployment", "attempt", "status"}
    assert all(context <= set(e) for e in failures)
    assert not any("message" in e for e in failures), "no provider text without HEADRACE_LOG_CONTENT"
    assert any(" ready." in e["event"] for e in worker)
    assert receiver.posts, "the webhooks were tried"


def test_with_log_content_the_prompt_may_be_logged_but_never_a_key(
    tmp_path: Path, receiver: Receiver
) -> None:
    """HEADRACE_LOG_CONTENT=true lets provider error text (and the prompt it echoes) into the log;
    the keys and the webhook's token it also echoes are still taken out."""
    run = _run_stack(tmp_path / "stack", receiver, log_content=True)
    for name, text in run.logs.items():
        for what, secret in run.secrets.items():
            assert secret[: len(secret) // 2] not in text, f"{name} holds the {what}"
    assert run.marker in run.logs["worker1.log"]
