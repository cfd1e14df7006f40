"""Logging for every Headrace process: structlog in front of the standard library, one format.

``configure_logging(settings)`` is called once by each process's entry (the worker through
Celery's ``setup_logging`` signal in ``broker_config.celery_app``; the API through the uvicorn
log config ``api_log_config`` builds, so that each of its processes sets itself up). One handler on
the root logger renders everything, Headrace's structlog events and the standard library's
records of celery, uvicorn, httpx and our older ``logging.getLogger`` calls alike:

- JSON lines when stderr is not a terminal, structlog's console renderer when it is;
  ``HEADRACE_LOG_FORMAT=json|console`` decides instead.
- Context bound with ``structlog.contextvars`` (request_id, batch_id, tenant, deployment,
  attempt) joins every record of the thread that bound it, the standard library's too.
- ``Scrubber`` is the last step before rendering, for every record: provider and Headrace API
  keys, bearer tokens, ``Authorization`` / ``x-api-key`` values, the values of the deployments'
  key variables, credentials in URLs, webhook URLs beyond their scheme and host, and prompt or
  completion fields (unless ``HEADRACE_LOG_CONTENT=true``) never reach a log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TextIO
from urllib.parse import unquote

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from broker_config.deployments import ConfigError, load_config
from broker_config.settings import Settings, get_settings
from broker_config.webhook_urls import redact_url

REDACTED = "[redacted]"
WITHHELD = "[withheld: HEADRACE_LOG_CONTENT=false]"
# Event keys whose values are secrets whatever they look like.
SECRET_KEYS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api_key", "api-key", "cookie", "set-cookie"}
)
# Event keys that hold prompt or completion text: logged only when the settings say so.
CONTENT_KEYS = frozenset({"prompt", "messages", "completion", "content", "body", "response"})
# Event keys holding a webhook URL: scheme and host only.
URL_KEYS = frozenset({"webhook_url", "url"})
# Variables that hold provider keys even when no deployment names them.
PROVIDER_KEY_ENVS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")
SHORTEST_SECRET = 8  # shorter values would blank out ordinary words
MAX_VALUE_CHARS = 500  # a longer value (a provider's error text, say) is cut, once scrubbed

_SECRET_PATTERN = re.compile(
    r"""
    (?P<header>\b(?:proxy-)?authorization|\bx-api-key|\bapi[-_]key)\b
        (?P<sep>["']?\s*[:=]\s*["']?)
        (?:(?:bearer|basic)\s+)?[^\s"',;}&]+       # "Authorization: Bearer ...", "x-api-key=..."
    | (?P<bearer>\bbearer)\s+[A-Za-z0-9._~+/=-]{6,}  # a bearer token alone
    | \bsk-(?:ant-)?[A-Za-z0-9_-]{6,}               # OpenAI and Anthropic keys
    | \bhr_[A-Za-z0-9_-]{16,}                       # Headrace API keys (db/tenants.py)
    | \bwhsec_[A-Za-z0-9+/=_-]{16,}                 # webhook signing secrets
    | (?P<hook>\bwebhook_url["']?\s*[:=]\s*["']?)(?P<hook_url>[^\s"'&,}]+)
    | (?P<url>\b[a-z][a-z0-9+.-]*://[^\s"'<>]+)
    """,
    re.IGNORECASE | re.VERBOSE,
)
# Every match of _SECRET_PATTERN holds one of these (lower-cased); a text without any is left alone.
_HINTS = ("authorization", "api-key", "api_key", "bearer", "sk-", "hr_", "whsec_", "webhook_url", "://")
_WHOLE_KEYS = frozenset({"event", "exception", "stack"})  # never cut
_OWN_KEYS = frozenset({"timestamp", "level", "logger", "request_id", "batch_id", "attempt"})
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@\s]*)@", re.IGNORECASE)


class Scrubber:
    """A structlog processor that takes secrets and content out of every string of an event."""

    def __init__(self, secrets: Iterable[str] = (), *, log_content: bool = False) -> None:
        values = sorted({s for s in secrets if len(s) >= SHORTEST_SECRET}, key=len, reverse=True)
        self._values = re.compile("|".join(map(re.escape, values))) if values else None
        self.log_content = log_content

    def __call__(self, _logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if key in _OWN_KEYS or key.startswith("_"):
                continue  # ours, or ProcessorFormatter's record and flags
            event_dict[key] = self._value(key, value)
        return event_dict

    def _value(self, key: str, value: Any) -> Any:
        lowered = key.lower()
        if lowered in SECRET_KEYS:
            return REDACTED
        if lowered in CONTENT_KEYS and not self.log_content:
            return WITHHELD
        if isinstance(value, str):
            if lowered in URL_KEYS:
                return redact_url(value)
            if lowered in _WHOLE_KEYS:
                return self.scrub(value)
            # Cut after scrubbing, never before: the head of a cut-off key would slip through.
            scrubbed = self.scrub(value)
            return scrubbed if len(scrubbed) <= MAX_VALUE_CHARS else scrubbed[:MAX_VALUE_CHARS] + "..."
        if isinstance(value, Mapping):
            return {k: self._value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value("", v) for v in value]
        return value

    def scrub(self, text: str) -> str:
        """``text`` without any secret this scrubber knows or recognises."""
        if self._values is not None:
            text = self._values.sub(REDACTED, text)
        # The pattern costs ~15 us on a line of text; these substring tests a tenth of that.
        lowered = text.lower()
        if any(hint in lowered for hint in _HINTS):
            return _SECRET_PATTERN.sub(_replace, text)
        return text


def _replace(match: re.Match[str]) -> str:
    if match["header"]:
        return f"{match['header']}{match['sep']}{REDACTED}"
    if match["bearer"]:
        return f"{match['bearer']} {REDACTED}"
    if match["hook"]:
        return match["hook"] + redact_url(unquote(match["hook_url"]))
    url = match["url"]
    if url:
        # A URL keeps its path unless it carries a query (tokens travel there) or credentials.
        if "?" in url:
            return redact_url(url)
        return _USERINFO.sub(lambda m: f"{m[1]}{REDACTED}@", url)
    return REDACTED


def known_secrets(settings: Settings) -> list[str]:
    """Values that must never be logged: the provider keys the deployments read (looked up once,
    at configuration), and Headrace's own passwords and key."""
    names = set(PROVIDER_KEY_ENVS)
    # A command that needs no deployments file still has the usual variables.
    with contextlib.suppress(ConfigError):
        names.update(d.key_env for d in load_config(settings.config).deployments)
    values = [os.environ.get(name, "") for name in sorted(names)]
    values += [settings.api_key or "", settings.redis_sentinel_password or ""]
    for pair in (settings.flower_basic_auth or "").split(","):
        values.append(pair.partition(":")[2])
    return [v for v in values if v]


LogFormat = Literal["json", "console"]


def resolve_format(settings: Settings, stream: TextIO | None = None) -> LogFormat:
    """JSON unless the stream is a terminal; the setting decides when it is not ``auto``."""
    if settings.log_format != "auto":
        return settings.log_format
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "console" if isatty is not None and isatty() else "json"


# Run for structlog's events (in the logging call) and for the standard library's records (in the
# formatter): the bound context, the logger's name, the level and the time.
_SHARED: list[Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_logger_name,
    structlog.stdlib.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure_structlog() -> None:
    """structlog's loggers hand their events to the standard library (idempotent); the root
    handler renders them. Tests call this alone, so that their log capture sees our events."""
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_SHARED,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def log_handler(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """The root handler: everything through the scrubber, then rendered as the settings say."""
    stream = stream or sys.stderr
    fmt = resolve_format(settings, stream)
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=bool(getattr(stream, "isatty", lambda: False)()),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Tracebacks become text first, so that the scrubber sees them too.
            structlog.processors.format_exc_info,
            Scrubber(known_secrets(settings), log_content=settings.log_content),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name(HANDLER_NAME)
    return handler


HANDLER_NAME = "headrace"


def configure_logging(
    settings: Settings, *, level: str | int | None = None, stream: TextIO | None = None
) -> None:
    """Set up this process's logging: structlog, and one handler on the root logger (replacing the
    handler an earlier call installed). ``level`` overrides ``settings.log_level``."""
    configure_structlog()
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(log_handler(settings, stream))
    root.setLevel(level or settings.log_level)
    # A worker says "<name> ready." whatever the level: whoever started it waits for that line
    # (headrace/stack.py).
    logging.getLogger("celery.apps.worker").setLevel(min(root.level, logging.INFO))
    _quiet_chatty_loggers(settings)


def _quiet_chatty_loggers(settings: Settings) -> None:
    # One INFO line per HTTP call from the clients would drown a worker's own log.
    for name in ("httpx", "httpcore", "httpx2", "httpcore2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The SDKs log each request's options at DEBUG, its messages among them: prompts.
    if not settings.log_content:
        for name in ("openai", "anthropic"):
            logging.getLogger(name).setLevel(logging.INFO)


def api_log_config() -> dict[str, Any]:
    """uvicorn's ``log_config``: it applies this in each of its processes (``--workers`` spawns
    fresh interpreters), so each one builds its root handler with ``settings_handler``."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {HANDLER_NAME: {"()": "broker_config.logs.settings_handler"}},
        "root": {"handlers": [HANDLER_NAME], "level": get_settings().log_level},
    }


def settings_handler() -> logging.Handler:
    """The root handler for this process's settings, structlog configured with it (for dictConfig)."""
    settings = get_settings()
    configure_structlog()
    _quiet_chatty_loggers(settings)
    return log_handler(settings)
