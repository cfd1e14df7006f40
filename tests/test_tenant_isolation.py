"""Every route that takes an id, on every door, answers another tenant's key with 404.

The routes come from the live API's OpenAPI document, not from a list here: a route added later
is checked as soon as it exists. Its path parameters are filled with real ids that tenant A
created (a batch of each door, an uploaded file, a batch's output and error files, a webhook
delivery); a parameter name this test has no id for fails it, so a new kind of id cannot slip by.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from db.engine import get_database
from db.tenants import create_api_key
from headrace.stack import EmbeddedStack

MSG = [{"role": "user", "content": "hi"}]
DOORS = ("/openai/v1", "/anthropic/v1", "/v1")  # longest prefix first


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    # No workers: the batches are cancelled before anything could run, which ends them at once.
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("tenants"),
        workers=0,
        simulator_args=("--latency-ms", "5"),
        extra_env={"HEADRACE_WEBHOOK_ALLOW_HOSTS": "127.0.0.1"},
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def _ids_of_tenant_a(stack: EmbeddedStack, a: httpx.Client) -> dict[tuple[str, str], list[str]]:
    """(door, path parameter) -> ids tenant A owns, each usable on that door."""
    line = {"custom_id": "a", "body": {"model": "fast", "messages": MSG}}
    native = a.post("/v1/batches", json={"requests": [line], "webhook_url": "http://127.0.0.1:9/hook"})
    native_id = native.json()["id"]
    sdk = openai.OpenAI(base_url=f"{stack.api_url}/openai/v1", api_key=stack.api_key, max_retries=0)
    upload = sdk.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    kept_file = sdk.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode())), purpose="batch")
    openai_id = sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    params = {"model": "fast", "max_tokens": 5, "messages": MSG}
    anthropic_id = a.post(
        "/anthropic/v1/messages/batches", json={"requests": [{"custom_id": "a", "params": params}]}
    ).json()["id"]
    for path in (
        f"/v1/batches/{native_id}/cancel",
        f"/openai/v1/batches/{openai_id}/cancel",
        f"/anthropic/v1/messages/batches/{anthropic_id}/cancel",
    ):
        a.post(path).raise_for_status()
    deadline = time.monotonic() + 10
    while not (deliveries := a.get("/v1/webhooks/deliveries").json()["data"]):
        assert time.monotonic() < deadline, "the cancelled batch queued no webhook delivery"
        time.sleep(0.1)
    suffix = openai_id.removeprefix("batch_")
    return {
        ("/v1", "batch_id"): [native_id, openai_id, anthropic_id],
        ("/v1", "delivery_id"): [deliveries[0]["id"]],
        ("/v1", "tenant"): ["demo"],  # the stack's tenant: its name is its id in /v1/tenants
        ("/v1", "name"): ["monthly"],  # a budget's name (only admins set them: no need to create it)
        ("/openai/v1", "batch_id"): [openai_id],
        ("/openai/v1", "file_id"): [kept_file.id, f"file-out-{suffix}", f"file-err-{suffix}"],
        ("/anthropic/v1", "batch_id"): [anthropic_id],
    }


def test_every_route_with_an_id_is_404_for_another_tenant(stack: EmbeddedStack) -> None:
    other_key = create_api_key(get_database(stack.env["HEADRACE_DATABASE_URL"]), "intruder").key
    common = {"anthropic-version": "2023-06-01"}
    with (
        httpx.Client(
            base_url=stack.api_url, headers={**common, "Authorization": f"Bearer {stack.api_key}"}
        ) as a,
        httpx.Client(base_url=stack.api_url, headers={**common, "Authorization": f"Bearer {other_key}"}) as b,
    ):
        ids = _ids_of_tenant_a(stack, a)
        paths = a.get("/openapi.json").json()["paths"]
        checked: list[str] = []
        for template, operations in sorted(paths.items()):
            names = re.findall(r"{(\w+)}", template)
            if not names:
                continue
            door = next(d for d in DOORS if template.startswith(d + "/"))
            for name in names:
                assert (door, name) in ids, f"{template}: no id of tenant A for {{{name}}}; add one above"
            for values in zip(*(ids[(door, name)] for name in names), strict=False):
                path = template
                for name, value in zip(names, values, strict=True):
                    path = path.replace(f"{{{name}}}", value)
                for method in operations:
                    if method.upper() == "GET":  # the id is real: tenant A reads it
                        assert a.get(path).status_code != 404, f"tenant A cannot read {path}"
                    response = b.request(method.upper(), path)
                    assert response.status_code == 404, f"{method.upper()} {path}: {response.status_code}"
                    checked.append(f"{method.upper()} {template}")
        # Nothing tenant B did reached tenant A's things.
        assert a.get(f"/openai/v1/files/{ids[('/openai/v1', 'file_id')][0]}").status_code == 200
        assert (
            a.get(f"/anthropic/v1/messages/batches/{ids[('/anthropic/v1', 'batch_id')][0]}").status_code
            == 200
        )
        assert len(set(checked)) >= 14, sorted(set(checked))  # the 14 such operations of today
