"""Webhook URLs often carry a token; the access log must not write one down whole.

A native JSONL upload may name its webhook in the query string (``?webhook_url=...``), and
uvicorn's access log writes every request's path with its query. This filter rewrites such
values to their scheme and host before the line is formatted.
"""

from __future__ import annotations

import logging
from urllib.parse import parse_qsl, urlencode

from broker_config.webhook_urls import redact_url

SECRET_PARAMS = frozenset({"webhook_url"})
ACCESS_LOGGER = "uvicorn.access"


def redact_query(path_with_query: str) -> str:
    """``/v1/batches?webhook_url=https://h/x?token=1`` -> ``/v1/batches?webhook_url=https://h/...``"""
    path, sep, query = path_with_query.partition("?")
    if not sep:
        return path_with_query
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(name in SECRET_PARAMS for name, _ in pairs):
        return path_with_query
    safe = [(name, redact_url(value) if name in SECRET_PARAMS else value) for name, value in pairs]
    return f"{path}?{urlencode(safe, safe=':/')}"


class RedactWebhookUrls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn: '%s - "%s %s HTTP/%s" %d' (client, method, path with query, version, status)
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Install the filter once per process (``create_app`` may run many times in tests)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not any(isinstance(f, RedactWebhookUrls) for f in logger.filters):
        logger.addFilter(RedactWebhookUrls())
