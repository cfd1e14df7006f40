"""Attribution tags: what a request's spend is counted against (feature, user, ...).

A request's tags are fixed at accept: for each key of ``settings.attribution_tags``, the batch's
metadata value, overridden by the request line's own ``metadata``. Values are text: strings as
they are, numbers and booleans in their JSON spelling (``1``, ``2.5``, ``true``); a null value is
no value. Anything else, or a value over ``MAX_TAG_CHARS``, is refused at the door.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from broker_config.settings import get_settings

MAX_TAG_CHARS = 200
# Not a tag but kept with them, from the same metadata: the request's own say on the answer cache
# (workers/answer_cache.py): on (cache it where its route has none), off, or refresh.
CACHE_TAG = "headrace_cache"
CACHE_MODES = ("on", "off", "refresh")


class TagError(ValueError):
    """A metadata value that cannot be a tag; the message names the key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"metadata.{key}: {reason}")
        self.param = f"metadata.{key}"


def tag_text(key: str, value: object) -> str:
    """``value`` as a tag's text, or TagError saying why it cannot be one."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value)):
        text = json.dumps(value)
    else:
        raise TagError(key, f"a tag must be a string, number or boolean, not {_kind(value)}")
    if len(text) > MAX_TAG_CHARS:
        raise TagError(key, f"a tag is at most {MAX_TAG_CHARS} characters, not {len(text)}")
    return text


def attribution_tags(metadata: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, str]:
    """The tags ``metadata`` sets among ``keys`` (other keys are not tags), and its ``CACHE_TAG``;
    TagError on a bad value."""
    if not metadata:
        return {}
    tags = {key: tag_text(key, metadata[key]) for key in keys if metadata.get(key) is not None}
    mode = metadata.get(CACHE_TAG)
    if mode is not None:
        if mode not in CACHE_MODES:
            raise TagError(CACHE_TAG, f"must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
        tags[CACHE_TAG] = mode
    return tags


def lenient_tags(metadata: Mapping[str, Any] | None, keys: Sequence[str]) -> dict[str, str]:
    """``attribution_tags`` for metadata stored before tags were checked: bad values are left out."""
    tags: dict[str, str] = {}
    for key in keys:
        try:
            tags |= attribution_tags(metadata, (key,))
        except TagError:
            continue
    return tags


def stored_tags(tags: Mapping[str, str] | None, batch_metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """A request's tags as the ledger holds them; a request accepted before tags were kept (NULL)
    is attributed by its batch's metadata."""
    if tags is not None:
        return dict(tags)
    return lenient_tags(batch_metadata, get_settings().attribution_tags)


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a non-finite number" if isinstance(value, float) else type(value).__name__
