"""Deterministic answers: the same (seed, model, prompt) always yields the same words.

An answer is N words and reports N output tokens. Capping by max_tokens keeps a prefix, so a
shorter max_tokens gives a prefix of the longer answer.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Literal

_WORDS = (
    "the of and to in is that it for as with was on be by this are from at or an not have but which "
    "river water stone bridge channel current flow level gate mill wheel race tail head weir sluice "
    "valley field north south east west morning evening light shadow signal answer question simple "
    "careful quiet steady rapid gentle strong clear bright small large early later often never always "
    "build carry measure follow return open close begin finish hold move turn send read write count "
    "worker queue task batch limit token request reply model number letter window minute second hour "
    "plan route path step place point line edge note list table record ledger price cost value"
)
_VOCABULARY = tuple(_WORDS.split())

FinishKind = Literal["end", "length", "stop"]


@dataclass(frozen=True)
class Answer:
    text: str
    output_tokens: int
    finish: FinishKind  # end: natural end; length: capped by max tokens; stop: a stop sequence cut it
    stop_sequence: str | None = None


def build_answer(
    *,
    seed: int,
    model: str,
    prompt: Any,
    min_tokens: int,
    max_tokens: int,
    forced_tokens: int | None,
    cap_tokens: int | None,
    stops: tuple[str, ...],
) -> Answer:
    """The answer to `prompt` (anything JSON-serialisable that identifies the request's input)."""
    rng = random.Random(_digest(seed, model, prompt))
    length = rng.randint(min_tokens, max_tokens) if forced_tokens is None else forced_tokens
    words = [rng.choice(_VOCABULARY) for _ in range(length)]
    if words:
        words[0] = words[0].capitalize()
    capped = cap_tokens is not None and cap_tokens < length
    if cap_tokens is not None:
        words = words[:cap_tokens]
    text = " ".join(words)
    hit = _first_stop(text, stops)
    if hit is not None:
        cut, stop = hit
        # The model "generated" every word up to the end of the stop sequence, then dropped it.
        generated = len(text[: cut + len(stop)].split())
        return Answer(text[:cut], generated, "stop", stop)
    if capped:
        return Answer(text, len(words), "length")
    return Answer(f"{text}." if text else text, len(words), "end")


def _first_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    found = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def _digest(seed: int, model: str, prompt: Any) -> int:
    material = json.dumps([seed, model, prompt], sort_keys=True, separators=(",", ":"), default=str)
    return int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big")
