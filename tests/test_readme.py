"""The README's SDK snippets work as written, against a running Headrace (only the host, the key
and the input file are filled in)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from headrace.stack import EmbeddedStack

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def snippet(marker: str) -> str:
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if marker in b)
    return block


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    stack = EmbeddedStack(
        tmp_path_factory.mktemp("readme"), worker_concurrency=4, simulator_args=("--latency-ms", "20")
    )
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def run(code: str, stack: EmbeddedStack, workdir: Path) -> str:
    code = code.replace("http://127.0.0.1:8000", stack.api_url)
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"HEADRACE_KEY": stack.api_key})
    finally:
        os.chdir(cwd)
    return out.getvalue()


def test_the_openai_snippet(stack: EmbeddedStack, tmp_path: Path) -> None:
    (tmp_path / "requests.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "fast", "messages": [{"role": "user", "content": f"Hi {i}"}]},
                }
            )
            + "\n"
            for i in range(3)
        )
    )
    printed = run(snippet("from openai import OpenAI"), stack, tmp_path)
    assert printed.startswith("completed") and printed.count('"custom_id"') == 3


def test_the_anthropic_snippet(stack: EmbeddedStack, tmp_path: Path) -> None:
    printed = run(snippet("import anthropic"), stack, tmp_path)
    assert printed.strip() == "q1 succeeded"


def test_every_test_the_guarantees_table_names_exists() -> None:
    """The README's Guarantees table names the tests that prove each promise: each module and
    test it names is there, so the table cannot quietly point at a test that was renamed away."""
    section = README.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    tests_dir = Path(__file__).resolve().parent
    named = re.findall(r"`(test_\w+)(?:::(test_\w+))?", section)
    assert len(named) > 10
    for module, test in named:
        source = tests_dir / f"{module}.py"
        assert source.exists(), f"README names {module}, which is not a test module"
        if test:
            assert re.search(rf"^def {test}\(", source.read_text(), re.M), f"{module} has no {test}"
