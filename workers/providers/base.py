"""What every provider adapter is: one method that makes one call, and a closed error set.

An adapter builds its SDK client with ``max_retries=0``, translates the canonical request (an
OpenAI Chat Completions body) to its provider's wire format, and the reply back. It does no
retries, touches no bucket and no database.

Errors: an adapter raises only ``CallFailed``; it carries the facts (HTTP status, provider error
type, what kind of failure, the provider's retry-after). Deciding what to do about it is the
policy's job (``workers.policy``), in one place::

    CallFailed
     ├─ kind="status"       the provider answered 4xx/5xx (status, error_type, error_code)
     ├─ kind="timeout"      connect or read timeout
     ├─ kind="connection"   refused, reset, DNS; a stream that broke mid-way (sent: it may have billed)
     ├─ kind="translation"  the request cannot be expressed for this provider (request's fault)
     ├─ kind="invalid_reply" the provider answered 2xx with something we cannot read
     └─ kind="unavailable"  the deployment cannot be called at all (its key is not set)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

import httpx
import httpx2

from broker_config.deployments import Deployment

log = logging.getLogger(__name__)

FailureKind = Literal["status", "timeout", "connection", "translation", "invalid_reply", "unavailable"]


@dataclass(frozen=True)
class ProviderCall:
    """One call to make: the canonical body, the deployment it goes to, and its limits."""

    deployment: Deployment
    body: dict[str, Any]
    timeout_s: float
    connect_timeout_s: float
    default_max_tokens: int
    # "request id:attempt number", sent as X-Headrace-Attempt so that a provider-side log (our
    # simulator's, a gateway's) can be matched call for call with the ledger's attempt rows.
    attempt_id: str | None = None

    def headers(self) -> dict[str, str]:
        return {"X-Headrace-Attempt": self.attempt_id} if self.attempt_id else {}


@dataclass(frozen=True)
class Usage:
    """Tokens as the provider billed them.

    ``input_tokens`` counts every prompt token, cache reads and writes included (OpenAI's
    ``prompt_tokens``; for Anthropic, input + cache_creation + cache_read), which is also what
    genai-prices expects.
    """

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class ProviderReply:
    body: dict[str, Any]  # a canonical chat.completion object, whatever the provider
    usage: Usage
    http_status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased; rate-limit headers etc.
    provider_request_id: str | None = None
    # Streamed calls only (None otherwise): seconds from sending the request to the first chunk
    # of output (time to first token), and how many chunks of output came.
    first_chunk_s: float | None = None
    chunks: int | None = None


class CallFailed(Exception):
    """The one exception an adapter raises; the policy classifies it."""

    def __init__(
        self,
        message: str,
        *,
        kind: FailureKind,
        status: int | None = None,
        error_type: str | None = None,
        error_code: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
        provider_request_id: str | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.kind: FailureKind = kind
        self.status = status
        self.error_type = error_type
        self.error_code = error_code
        self.retry_after_s = retry_after_s
        self.headers = headers or {}
        self.provider_request_id = provider_request_id
        # Whether the request reached the provider (False: refused or timed out while connecting),
        # so that it may have done, and billed, some work.
        self.sent = sent

    def as_error(self) -> dict[str, Any]:
        """The error as it is stored in the ledger and shown in result lines."""
        return {
            "kind": self.kind,
            "status": self.status,
            "type": self.error_type,
            "code": self.error_code,
            "message": self.message,
        }


def requested_max_tokens(body: Mapping[str, Any], default: int) -> int:
    """The output cap a canonical body asks for, or ``default`` when it names none.

    Admission reserves this, and an adapter sends ``default`` when the body names no cap, so what
    is reserved and what is sent are one number. It lives here, below both, because an adapter
    must not import ``workers.admission`` (admission reads the adapters' replies).
    """
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


# The SDKs moved from httpx to its fork httpx2 (openai 3.x, anthropic 2.x), whose classes are not
# httpx's: both families are checked, whichever an installed SDK raises.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
)


def reached_provider(exc: BaseException) -> bool:
    """Whether an SDK's connection or timeout error happened after the request was sent: the SDKs
    wrap httpx's exception, whose class says the phase (connecting, or waiting for the answer)."""
    cause = exc if isinstance(exc, httpx.HTTPError | httpx2.HTTPError) else exc.__cause__
    return not isinstance(cause, _NOT_SENT)


class TranslationError(ValueError):
    """The canonical request cannot be expressed in a provider's format (the request's fault)."""


class ProviderAdapter(Protocol):
    name: str

    def complete(self, call: ProviderCall) -> ProviderReply: ...


Client = TypeVar("Client")


class ClientCache(Generic[Client]):
    """One SDK client per endpoint and key, shared by a worker's threads.

    SDK clients are thread-safe and hold a connection pool, so building one per call would
    throw the pool away every time. Timeouts are not part of the key: the pipeline clips each
    call's timeout to its request's deadline, so a client per timeout meant a new client and a
    pool (never closed) per attempt. Adapters pass the timeouts with each call instead.
    """

    def __init__(self, build: Callable[[ProviderCall, str], Client]) -> None:
        self._build = build
        self._clients: dict[tuple[str | None, str], Client] = {}
        self._lock = threading.Lock()

    def get(self, call: ProviderCall) -> Client:
        dep = call.deployment
        api_key = dep.api_key()
        if not api_key:
            raise CallFailed(f"deployment {dep.name!r}: no API key (set ${dep.key_env})", kind="unavailable")
        key = (dep.base_url, api_key)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = self._build(call, api_key)
            return client


def call_provider(adapter: ProviderAdapter, call: ProviderCall) -> ProviderReply | CallFailed:
    """The call, with every failure turned into a ``CallFailed``: never raises."""
    try:
        return adapter.complete(call)
    except CallFailed as failure:
        return failure
    except Exception as exc:  # an adapter bug must not lose the request or its attempt row
        log.exception("adapter %s raised %s", adapter.name, type(exc).__name__)
        return CallFailed(f"{type(exc).__name__}: {exc}", kind="invalid_reply")
