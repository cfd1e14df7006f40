"""What an operator sees, in a real browser (headless Chromium) against a live embedded stack with
every host but 127.0.0.1 unresolvable: Flower's broker page shows the three queues and how many
messages wait in each, and the API's /docs and /redoc render every operation with no CDN to lean on.

Screenshots go to the test's tmp_path, and to $HEADRACE_TEST_ARTIFACTS as well when it is set."""

from __future__ import annotations

import html
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker_config.queues import ALL_QUEUES
from headrace.stack import EmbeddedStack
from tests.infra.chromium import chromium_binary, dump_dom, screenshot

# Read at import: the suite's autouse fixture clears HEADRACE_* variables before each test.
ARTIFACTS = os.environ.get("HEADRACE_TEST_ARTIFACTS")
# Requests left waiting per queue: no worker runs, so the counts hold still.
WAITING = {"interactive": 1, "default": 2, "bulk": 3}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> None:
    if chromium_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs Debian's package")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def stack(browser: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    """API, simulator, Redis and Flower, but no worker; Flower without basic auth, as on loopback."""
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("browser-stack"),
        workers=0,
        with_flower=True,
        extra_env={"HEADRACE_FLOWER_BASIC_AUTH": ""},
    )
    try:
        stack.start()
        with httpx.Client(
            base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=30
        ) as client:
            for priority, count in WAITING.items():
                lines = [
                    {
                        "custom_id": f"{priority}-{i}",
                        "body": {"model": "fast", "messages": [{"role": "user", "content": "hi"}]},
                    }
                    for i in range(count)
                ]
                created = client.post("/v1/batches", json={"requests": lines, "priority": priority})
                assert created.status_code == 201, created.text
        yield stack
    finally:
        stack.stop()


def _keep(picture: Path) -> Path:
    """The screenshot, copied to $HEADRACE_TEST_ARTIFACTS when set; its path is printed."""
    kept = picture
    if ARTIFACTS:
        Path(ARTIFACTS).mkdir(parents=True, exist_ok=True)
        kept = Path(shutil.copy2(picture, Path(ARTIFACTS) / picture.name))
    print(f"screenshot: {kept}")
    return kept


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment)).strip()


def test_flowers_broker_page_shows_each_queue_with_its_waiting_messages(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    """One row per queue (interactive, default, bulk), each with the number of requests queued."""
    url = f"{stack.flower_url}/broker"
    dom = dump_dom(url)
    rows = {
        _text(cells[0]): _text(cells[1])
        for row in re.findall(r"<tr id=\"[^\"]*\">(.*?)</tr>", dom, re.S)
        if len(cells := re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)) >= 2
    }
    assert sorted(ALL_QUEUES) == sorted(WAITING)
    assert rows == {queue: str(count) for queue, count in WAITING.items()}, rows
    _keep(screenshot(url, tmp_path / "flower-broker.png"))


def test_the_api_docs_render_every_operation_offline(stack: EmbeddedStack, tmp_path: Path) -> None:
    """Swagger UI, served by the API itself, lists each operation of the OpenAPI document (the
    batch routes among them) while no host but 127.0.0.1 resolves."""
    url = f"{stack.api_url}/docs"
    dom = dump_dom(url)
    shown = set(re.findall(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom, re.S))
    document = httpx.get(f"{stack.api_url}/openapi.json", timeout=30).json()
    declared = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert shown == declared, (declared - shown, shown - declared)
    batch_operations = {
        ("POST", "/v1/batches"),
        ("GET", "/v1/batches"),
        ("GET", "/v1/batches/{batch_id}"),
        ("POST", "/v1/batches/{batch_id}/cancel"),
        ("GET", "/v1/batches/{batch_id}/results"),
    }
    assert batch_operations <= shown, batch_operations - shown
    _keep(screenshot(url, tmp_path / "api-docs.png"))


def test_the_api_redoc_renders_every_operation_offline(stack: EmbeddedStack, tmp_path: Path) -> None:
    """ReDoc, served by the API itself, has a section for each operation of the OpenAPI document
    while no host but 127.0.0.1 resolves."""
    url = f"{stack.api_url}/redoc"
    dom = dump_dom(url)
    shown = set(re.findall(r'data-section-id="operation/([^"]+)"', dom))
    document = httpx.get(f"{stack.api_url}/openapi.json", timeout=30).json()
    declared = {op["operationId"] for ops in document["paths"].values() for op in ops.values()}
    assert shown == declared, (declared - shown, shown - declared)
    assert "create_batch_v1_batches_post" in shown
    _keep(screenshot(url, tmp_path / "api-redoc.png"))
