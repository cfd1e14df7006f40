"""Priorities as queues plus message priorities, shared by the publisher and the workers.

Each priority has its own queue (for Flower and for dedicated workers) *and* its own kombu
priority step. On the Redis transport a worker BRPOPs every queue's step-0 list before any
lower step, so an interactive message overtakes queued bulk work whatever the queue order
(kombu#801 makes queue order unreliable on released kombu). On Redis, 0 is the highest.
"""

from __future__ import annotations

from db.states import Priority

QUEUE_PRIORITY: dict[Priority, int] = {
    Priority.INTERACTIVE: 0,
    Priority.DEFAULT: 3,
    Priority.BULK: 9,
}
# kombu's default steps are [0, 3, 6, 9]; spelled out because producer, workers and Flower
# must agree on them exactly, or messages land in lists nobody polls.
PRIORITY_STEPS = [0, 3, 6, 9]
ALL_QUEUES = [p.value for p in Priority]

RUN_REQUEST_TASK = "headrace.run_request"


def queue_for(priority: str) -> tuple[str, int]:
    """The (queue name, message priority) a request of this priority is published with."""
    level = Priority(priority)
    return level.value, QUEUE_PRIORITY[level]


def broker_lists() -> list[str]:
    """The Redis lists kombu keeps our queues in: one per queue and priority step.

    kombu names the step-0 list after the queue and the others ``queue + "\\x06\\x16" + step``
    (its default separator, which we never change: producers and workers must agree on it).
    """
    return [
        queue if step == 0 else f"{queue}\x06\x16{step}" for queue in ALL_QUEUES for step in PRIORITY_STEPS
    ]


def broker_unacked_key() -> str:
    """kombu's hash of delivered, unacknowledged messages (reserved or running in some worker):
    delivery tag -> message. Its default name, which we never change."""
    return "unacked"


def broker_unacked_index_key() -> str:
    """kombu's sorted set of those delivery tags, scored by when each was delivered (epoch s)."""
    return "unacked_index"
