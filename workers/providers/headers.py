"""Reading what providers say in response headers: retry-after and the rate-limit family."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

_KEPT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers worth keeping from a reply: rate limits and retry hints, lower-cased."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_KEPT_PREFIXES)}


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks us to wait, the way the SDKs read it.

    ``retry-after-ms`` first, then ``retry-after`` as seconds (floats accepted), then as an
    HTTP date. None when absent or unreadable.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    if parsed is None:
        return None
    return max(parsed.timestamp() - time.time(), 0.0)
