"""Per-request directives and random faults: the two ways a call gets an outcome other than success.

Directives live in the text of the last user message, e.g. ``[[sim:status=429,retry_after=2]]``
or ``[[sim:hang]] [[sim:latency_ms=5]]``. Keys: status=<400..599>, error=context_length,
hang or hang=<s>, latency_ms=<ms>, output_tokens=<n>, retry_after=<s>, and
retry_after_raw=<text>: the retry-after header of a status reply set to <text> verbatim, to see
what clients make of a value no provider should send ("soon", "", a broken date). <text> is
percent-decoded, so that the spaces and commas of a date can be written %20 and %2C.
stream_break=<n>: a streamed reply drops its connection after <n> sends of output (0: right after
its 200 and headers), as a provider that fails mid-stream; an unstreamed reply ignores it.
An unknown key is a 400, so a typo in a test cannot pass silently.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from urllib.parse import unquote

from headrace.simulator.config import FaultKind

_DIRECTIVE = re.compile(r"\[\[sim:([^\]]*)\]\]")


class DirectiveError(ValueError):
    pass


@dataclass(frozen=True)
class Directives:
    status: int | None = None
    context_length: bool = False
    hang: bool = False
    hang_s: float | None = None
    latency_ms: float | None = None
    output_tokens: int | None = None
    retry_after_s: float | None = None
    retry_after_raw: str | None = None
    stream_break: int | None = None

    @property
    def forces_outcome(self) -> bool:
        return self.status is not None or self.context_length or self.hang


def parse_directives(text: str) -> Directives:
    values: dict[str, str | None] = {}
    for body in _DIRECTIVE.findall(text):
        for item in re.split(r"[,;\s]+", body.strip()):
            if item:
                key, sep, value = item.partition("=")
                values[key.strip()] = value.strip() if sep else None
    if not values:
        return Directives()
    known = {
        "status",
        "error",
        "hang",
        "latency_ms",
        "output_tokens",
        "retry_after",
        "retry_after_raw",
        "stream_break",
    }
    unknown = set(values) - known
    if unknown:
        raise DirectiveError(f"unknown simulator directive(s): {', '.join(sorted(unknown))}")
    status = _int(values, "status")
    if status is not None and not 400 <= status <= 599:
        raise DirectiveError("directive status must be between 400 and 599")
    error = values.get("error")
    if "error" in values and error != "context_length":
        raise DirectiveError("directive error supports only error=context_length")
    output_tokens = _int(values, "output_tokens")
    return Directives(
        status=status,
        context_length=error == "context_length",
        hang="hang" in values,
        hang_s=_float(values, "hang"),
        latency_ms=_float(values, "latency_ms"),
        output_tokens=output_tokens,
        retry_after_s=_float(values, "retry_after"),
        retry_after_raw=_raw_header(values),
        stream_break=_int(values, "stream_break"),
    )


def _raw_header(values: dict[str, str | None]) -> str | None:
    if "retry_after_raw" not in values:
        return None
    raw = values["retry_after_raw"]
    if raw is None:
        raise DirectiveError("directive retry_after_raw needs a value (retry_after_raw= for an empty one)")
    if "retry_after" in values:
        raise DirectiveError("give retry_after or retry_after_raw, not both")
    text = unquote(raw)
    # A header value must stay one printable ASCII line, or the reply could not be sent at all.
    if any(not " " <= char <= "~" for char in text):
        raise DirectiveError("directive retry_after_raw must decode to printable ASCII")
    return text


def _float(values: dict[str, str | None], key: str) -> float | None:
    raw = values.get(key)
    if raw is None:
        return None
    try:
        number = float(raw)
    except ValueError:
        raise DirectiveError(f"directive {key} needs a number, got {raw!r}") from None
    if not number >= 0:
        raise DirectiveError(f"directive {key} must not be negative")
    return number


def _int(values: dict[str, str | None], key: str) -> int | None:
    number = _float(values, key)
    if number is None:
        return None
    if not number.is_integer():
        raise DirectiveError(f"directive {key} needs a whole number")
    return int(number)


class FaultDice:
    """Seeded streams for fault rolls and latency jitter: reproducible per seed, different per call."""

    def __init__(self, seed: int) -> None:
        self._faults = random.Random(f"faults:{seed}")
        self._latency = random.Random(f"latency:{seed}")

    def roll(self, rate: float, kinds: list[FaultKind]) -> FaultKind | None:
        if rate <= 0:
            return None
        if self._faults.random() >= rate:
            return None
        return self._faults.choice(kinds)

    def latency_s(self, mean_ms: float, jitter_ms: float) -> float:
        jitter = self._latency.uniform(-jitter_ms, jitter_ms) if jitter_ms > 0 else 0.0
        return max(0.0, mean_ms + jitter) / 1000.0
