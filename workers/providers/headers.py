"""Reading what providers say in response headers: retry-after and the rate-limit family."""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from datetime import UTC

# The Date header too: an Anthropic reset is a time, read against the provider's own clock.
_KEPT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after", "date")


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers worth keeping from a reply: rate limits, retry hints and the reply's date,
    lower-cased."""
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(_KEPT_PREFIXES)}


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds the provider asks us to wait, the way the SDKs read it.

    ``retry-after-ms`` first, then ``retry-after`` as seconds (floats accepted), then as an
    HTTP date. None when absent or unreadable. Never raises: it runs while a provider's error
    is being translated, and a garbage header must leave a 429 a 429.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = _number(lowered.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # "soon", "", "Wed, 99 Foo": parsedate_to_datetime raises on all of them
    if parsed.tzinfo is None:  # "-0000" means UTC with no zone known (RFC 5322)
        parsed = parsed.replace(tzinfo=UTC)
    return max(parsed.timestamp() - time.time(), 0.0)


def _number(value: str | None) -> float | None:
    """A finite, non-negative number of the header's own unit, or None."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    # "nan" and "inf" parse as floats, but no wait can be computed from them.
    return max(number, 0.0) if math.isfinite(number) else None
