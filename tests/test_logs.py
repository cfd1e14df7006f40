"""broker_config/logs.py: one format for every record, context bound once, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from broker_config.logs import HANDLER_NAME, REDACTED, WITHHELD, Scrubber, configure_logging, resolve_format
from broker_config.settings import Settings

HR_KEY = "hr_" + "A1b2C3d4" * 5
OPENAI_KEY = "sk-proj-" + "x9" * 20
ANTHROPIC_KEY = "sk-ant-api03-" + "y8" * 20


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logged(tmp_path: Any) -> Iterator[io.StringIO]:
    """The root logger writes JSON lines to a buffer; put back as it was afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    stream = io.StringIO()
    configure_logging(Settings(log_format="json", config=tmp_path / "none.toml"), stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_keys_and_tokens_are_scrubbed_wherever_they_appear() -> None:
    """Provider keys, Headrace keys, bearer tokens and header values become [redacted]."""
    scrub = Scrubber().scrub
    for text in (
        f"Incorrect API key provided: {OPENAI_KEY}.",
        f"invalid x-api-key {ANTHROPIC_KEY}",
        f"Authorization: Bearer {HR_KEY}",
        f"{{'authorization': 'Bearer abc.def-ghi', 'x-api-key': '{ANTHROPIC_KEY}'}}",
        f'"api_key": "{OPENAI_KEY}"',
    ):
        scrubbed = scrub(text)
        assert REDACTED in scrubbed
        for secret in (HR_KEY, OPENAI_KEY, ANTHROPIC_KEY, "abc.def-ghi", "x9x9x9", "y8y8y8"):
            assert secret not in scrubbed, scrubbed
    assert (
        scrub("api_key_env = OPENAI_API_KEY; task-1234567 done")
        == "api_key_env = OPENAI_API_KEY; task-1234567 done"
    )


def test_known_secret_values_are_scrubbed_whatever_their_shape() -> None:
    """A deployment's key that looks like nothing in particular is still found by its value."""
    scrubber = Scrubber(["plainvalue-42-secret", "short"])
    assert scrubber.scrub("key plainvalue-42-secret rejected") == f"key {REDACTED} rejected"
    assert scrubber.scrub("a short word") == "a short word", "values under 8 characters are not secrets"


def test_urls_lose_their_query_credentials_and_webhook_paths() -> None:
    """A URL with a query becomes its scheme and host; credentials go; a webhook URL keeps its host only."""
    scrub = Scrubber().scrub
    assert scrub("POST https://h.example:8443/hook/T0KEN?sig=S3CRET failed") == (
        "POST https://h.example:8443/... failed"
    )
    assert (
        scrub("connected to redis://:p4ssword@10.0.0.1:6379/0")
        == f"connected to redis://{REDACTED}@10.0.0.1:6379/0"
    )
    assert scrub("GET /v1/batches?webhook_url=https%3A%2F%2Fh.example%2Fhook%2FT0KEN") == (
        "GET /v1/batches?webhook_url=https://h.example/..."
    )
    assert scrub("calling http://127.0.0.1:9100/v1/chat/completions") == (
        "calling http://127.0.0.1:9100/v1/chat/completions"
    )
    event = Scrubber()(None, "info", {"event": "x", "webhook_url": "https://h.example/hook/T0KEN"})
    assert event["webhook_url"] == "https://h.example/..."


def test_content_is_withheld_unless_the_settings_allow_it() -> None:
    """Prompt and completion fields are withheld by default, logged with log_content; keys never."""
    event = {"event": "x", "prompt": "tell me", "headers": {"Authorization": f"Bearer {HR_KEY}"}}
    assert Scrubber()(None, "info", dict(event)) == {
        "event": "x",
        "prompt": WITHHELD,
        "headers": {"Authorization": REDACTED},
    }
    assert Scrubber(log_content=True)(None, "info", dict(event))["prompt"] == "tell me"


def test_a_long_value_is_cut_only_after_it_is_scrubbed() -> None:
    """The head of a key at a value's cut is not left behind."""
    text = "x" * 490 + " " + OPENAI_KEY
    cut = Scrubber()(None, "info", {"event": "e", "message": text})["message"]
    assert "sk-" not in cut and cut.startswith("x" * 490)


def test_the_format_follows_the_terminal_unless_the_settings_say() -> None:
    """JSON to a file or pipe, console to a terminal; HEADRACE_LOG_FORMAT overrides."""
    assert resolve_format(Settings(), io.StringIO()) == "json"
    assert resolve_format(Settings(), Tty()) == "console"
    assert resolve_format(Settings(log_format="json"), Tty()) == "json"
    assert resolve_format(Settings(log_format="console"), io.StringIO()) == "console"
    assert Settings(log_level="debug").log_level == "DEBUG"  # type: ignore[arg-type]


def test_structlog_and_stdlib_records_share_one_format_and_the_bound_context(logged: io.StringIO) -> None:
    """Our events and a library's records are JSON lines with the same keys and the thread's context."""
    structlog.contextvars.bind_contextvars(request_id="req_1", batch_id="batch_1")
    structlog.get_logger("workers.test").info("call failed", status=500, error=f"bad key {OPENAI_KEY}")
    logging.getLogger("celery.test").warning("task %s failed: %s", "t1", f"Bearer {HR_KEY}")
    ours, theirs = _events(logged)
    assert ours["event"] == "call failed" and ours["status"] == 500 and ours["error"] == f"bad key {REDACTED}"
    assert theirs["event"] == f"task t1 failed: Bearer {REDACTED}"
    for event in (ours, theirs):
        assert event["request_id"] == "req_1" and event["batch_id"] == "batch_1"
        assert {"timestamp", "level", "logger"} <= set(event)


def test_a_traceback_is_scrubbed_too(logged: io.StringIO) -> None:
    """An exception's text reaches the log through the scrubber."""
    try:
        raise RuntimeError(f"provider said: {ANTHROPIC_KEY}")
    except RuntimeError:
        logging.getLogger("workers.test").exception("adapter raised")
    (event,) = _events(logged)
    assert "RuntimeError" in event["exception"] and ANTHROPIC_KEY not in event["exception"]


def test_context_bound_in_one_thread_is_not_seen_in_another(logged: io.StringIO) -> None:
    """contextvars are per thread: a pool thread's ids do not leak into other threads' lines."""
    structlog.contextvars.bind_contextvars(request_id="req_main")

    def other() -> None:
        structlog.get_logger("workers.test").info("elsewhere")

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    (event,) = _events(logged)
    assert "request_id" not in event


def test_configuring_twice_keeps_one_handler(logged: io.StringIO, tmp_path: Any) -> None:
    """Celery's setup_logging signal configures again after the worker command did: still one handler."""
    configure_logging(Settings(log_format="json", config=tmp_path / "none.toml"), stream=logged)
    assert [h.get_name() for h in logging.getLogger().handlers].count(HANDLER_NAME) == 1
