"""How long the queues are and how old their oldest message is, read from the broker's Redis.

kombu keeps each queue in one Redis list per priority step (``queues.broker_lists``); it pushes on
the left and workers pop on the right, so a list's oldest message is its last element. Every
message Headrace publishes carries its publish time in a header (``PUBLISHED_AT_HEADER``), which
is what the age is read from. Read-only; one pipelined round trip for depths, one for the tails.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

import redis

from broker_config.queues import ALL_QUEUES, PRIORITY_STEPS

PUBLISHED_AT_HEADER = "headrace_published_at"


@dataclass(frozen=True)
class QueueState:
    priority: str  # the queue's name is its priority
    depth: int  # messages waiting (delivered ones are in workers, not here)
    oldest_age_s: float  # of the oldest waiting message; 0 when none waits


def step_lists(queue: str) -> list[str]:
    """The Redis lists of one queue, one per priority step (kombu's names)."""
    return [queue if step == 0 else f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS]


def read_queues(client: redis.Redis, now: float | None = None) -> list[QueueState]:
    now = time.time() if now is None else now
    lists = {queue: step_lists(queue) for queue in ALL_QUEUES}
    pipe = client.pipeline(transaction=False)
    for names in lists.values():
        for name in names:
            pipe.llen(name)
            pipe.lindex(name, -1)
    replies = iter(pipe.execute())
    states = []
    for queue, names in lists.items():
        depth, oldest = 0, None
        for _ in names:
            length, tail = cast(int, next(replies)), cast(bytes | None, next(replies))
            depth += length
            published = _published_at(tail)
            if published is not None and (oldest is None or published < oldest):
                oldest = published
        states.append(QueueState(queue, depth, max(0.0, now - oldest) if oldest is not None else 0.0))
    return states


def _published_at(message: bytes | None) -> float | None:
    """The publish time a message's header carries (None: no message, or not one of ours)."""
    if not message:
        return None
    try:
        value = json.loads(message).get("headers", {}).get(PUBLISHED_AT_HEADER)
        return float(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None
