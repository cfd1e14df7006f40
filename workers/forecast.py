"""A provider's rate-limit headers read as a forecast, limit by limit.

Each answer (a 429 too) says, per limit: the per-minute ``limit``, the room ``remaining`` now,
and when the room comes back (``reset``). A token bucket's reset is its time to full, which
always equals (limit - remaining) / (limit per second); any other answer says the room returns
at a moment (a window's end, a rolling window's next expiry), and the bucket holds until then
(``lua/prelude.lua``, ``lua/bucket_settle.lua``).

The reset is read as a duration on the provider's own clock, never against ours, so that clock
skew between us and the provider cannot move it:

- OpenAI ``x-ratelimit-reset-*``: a Go duration ("6m0s", "1.2s", "20ms").
- Anthropic ``anthropic-ratelimit-*-reset``: an RFC 3339 time, taken from the answer's own
  ``Date`` header (both are the provider's clock, one second apart at worst); without a ``Date``
  the reset is not read.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from broker_config.deployments import Deployment

# Per provider and limit: (limit header, remaining header, reset header).
_HEADERS = {
    "openai": {
        name: tuple(f"x-ratelimit-{part}-{name}" for part in ("limit", "remaining", "reset"))
        for name in ("requests", "tokens")
    },
    "anthropic": {
        name: tuple(
            f"anthropic-ratelimit-{name.replace('_', '-')}-{part}" for part in ("limit", "remaining", "reset")
        )
        for name in ("requests", "input_tokens", "output_tokens", "tokens")
    },
}
_GO_DURATION = re.compile(
    r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?$"
)


@dataclass(frozen=True)
class Forecast:
    """What the provider's headers said of one limit (None: not said)."""

    limit: int | None = None  # per minute
    remaining: int | None = None  # room now
    reset_s: float | None = None  # when the room comes back, seconds from the answer


def forecasts(deployment: Deployment, headers: Mapping[str, str]) -> dict[str, Forecast]:
    """What the provider's rate-limit headers say of each of the deployment's limits."""
    table = _HEADERS[deployment.provider]
    seen: dict[str, Forecast] = {}
    for name in deployment.limits():
        limit_header, remaining_header, reset_header = table[name]
        limit, remaining = _int(headers.get(limit_header)), _int(headers.get(remaining_header))
        raw_reset = headers.get(reset_header)
        if deployment.provider == "anthropic":
            reset = seconds_until(raw_reset, headers.get("date"))
        else:
            reset = go_duration_s(raw_reset)
        if limit is not None or remaining is not None:
            seen[name] = Forecast(limit, remaining, reset)
    return seen


def go_duration_s(text: str | None) -> float | None:
    """Seconds of a Go-style duration as OpenAI writes it ("1m30.5s", "20ms"); None if unreadable."""
    match = _GO_DURATION.match(text.strip()) if text else None
    if match is None or not any(match.groups()):
        return None
    hours, minutes, seconds, millis = (float(part) if part else 0.0 for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def seconds_until(moment: str | None, date: str | None) -> float | None:
    """Seconds from an answer's ``Date`` (an HTTP date) to an RFC 3339 ``moment``, never negative."""
    if not moment or not date:
        return None
    try:
        until = datetime.fromisoformat(moment.strip())
        sent = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    until = until if until.tzinfo else until.replace(tzinfo=UTC)
    sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
    return max(0.0, (until - sent).total_seconds())


def _int(value: str | None) -> int | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    # A header saying "inf" or "nan" says nothing.
    return int(number) if number is not None and math.isfinite(number) else None
