"""Publishing requests to their priority queues, by task name (the API never imports workers)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from broker_config import tracing
from broker_config.celery_app import app
from broker_config.queue_state import PUBLISHED_AT_HEADER
from broker_config.queues import RUN_REQUEST_TASK, queue_for

PIPELINE_SIZE = 500


def publish_requests(requests: Iterable[tuple[str, str]]) -> int:
    """Publish ``(request_id, priority)`` pairs on one connection; returns how many were sent.

    The messages go out in Redis pipelines of ``PIPELINE_SIZE`` (kombu's producer batches): one
    round trip per pipeline instead of per message made accepting 50,000 requests several times
    faster. Raises a ``KombuError`` when the broker is unreachable or a pipeline fails; the caller
    leaves those requests unmarked, and the publisher sweep sends them again.
    """
    sent = 0
    # The accepting span's W3C context (when traces are on): each request's run joins its trace.
    traced = tracing.inject({})
    with app.producer_or_acquire() as producer, producer.batch(max_size=PIPELINE_SIZE):
        for request_id, priority in requests:
            queue, level = queue_for(priority)
            app.send_task(
                RUN_REQUEST_TASK,
                args=[request_id],
                queue=queue,
                priority=level,
                producer=producer,
                # When it was published: how old the oldest waiting message is (queue_state.py).
                headers={PUBLISHED_AT_HEADER: round(time.time(), 3), **traced},
                # The message carries only the id: prompts and outputs live in the ledger.
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
            )
            sent += 1
    return sent
