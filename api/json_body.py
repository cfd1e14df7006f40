"""Decoding a batch sent as one JSON object, one array element at a time.

``json.loads`` of a whole 200 MB body is one C call that holds the GIL from start to end, so the
event loop (every other request of the process) would wait for it even from a worker thread; and
a single element nested 100,000 deep makes it raise ``RecursionError`` for the whole body, with
no position. Here the top-level object is walked by hand and each member value, and each element
of the batch array, is its own ``raw_decode``: the GIL is free between elements, and an element
too deep to decode is named by its index.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from api.gc_pause import enforce_bound

# Any depth a real request needs is far below this; deeper would also break json.dumps when the
# line is stored (the interpreter's recursion limit is shared by the encoder and the caller).
MAX_JSON_DEPTH = 64
NESTED_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
YIELD_EVERY_ITEMS = 128  # hand the GIL to the event loop this often (see api/batch_input.py)
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonBodyError(ValueError):
    """The body cannot be read as the expected JSON object; ``index`` names the element at fault."""

    def __init__(self, reason: str, index: int | None = None, where: str | None = None) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.index = index


def too_deep(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` nests arrays/objects more than ``limit`` levels (iteratively: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


def _value(text: str, pos: int, where: str, index: int | None = None) -> tuple[Any, int]:
    try:
        return _DECODER.raw_decode(text, pos)
    except RecursionError:
        raise JsonBodyError(NESTED_TOO_DEEP, index, where) from None
    except json.JSONDecodeError as exc:
        raise JsonBodyError(f"the body is not valid JSON: {exc}", index) from None


def _array(text: str, pos: int, key: str, on_item: Callable[[int, Any], None]) -> int:
    """Decode the array at ``pos`` element by element; returns the position after it."""
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    index = 0
    while True:
        item, pos = _value(text, pos, f"{key}[{index}]", index)
        if too_deep(item):
            raise JsonBodyError(NESTED_TOO_DEEP, index, f"{key}[{index}]")
        on_item(index, item)
        index += 1
        if index % YIELD_EVERY_ITEMS == 0:
            time.sleep(0)
            enforce_bound()
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("]", pos):
            return pos + 1
        else:
            raise JsonBodyError(f"the body is not valid JSON: expected ',' or ']' after {key}[{index - 1}]")


def decode_object(raw: bytes, array_key: str, on_item: Callable[[int, Any], None]) -> dict[str, Any]:
    """The body's top-level members; the array under ``array_key`` is handed to ``on_item``
    element by element (its member is then ``[]``). Other members are capped in depth too."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonBodyError(f"the body is not UTF-8: {exc}") from None
    pos = _skip(text, 0)
    if not text.startswith("{", pos):
        raise JsonBodyError("the body must be a JSON object")
    members: dict[str, Any] = {}
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        pos += 1
    else:
        while True:
            if not text.startswith('"', pos):
                raise JsonBodyError(f"the body is not valid JSON: expected a member name at char {pos}")
            key, pos = _value(text, pos, "the body")
            pos = _skip(text, pos)
            if not text.startswith(":", pos):
                raise JsonBodyError(f"the body is not valid JSON: expected ':' after {key!r}")
            pos = _skip(text, pos + 1)
            if key in members:
                raise JsonBodyError(f"{key}: given twice")
            if key == array_key and text.startswith("[", pos):
                pos = _array(text, pos, key, on_item)
                members[key] = []
            else:
                members[key], pos = _value(text, pos, key)
                if too_deep(members[key]):
                    raise JsonBodyError(NESTED_TOO_DEEP, where=key)
            pos = _skip(text, pos)
            if text.startswith(",", pos):
                pos = _skip(text, pos + 1)
            elif text.startswith("}", pos):
                pos += 1
                break
            else:
                raise JsonBodyError(f"the body is not valid JSON: expected ',' or '}}' after {key!r}")
    if _skip(text, pos) != len(text):
        raise JsonBodyError("the body is not valid JSON: extra data after the object")
    return members
