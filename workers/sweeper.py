"""The publisher sweep: publishes requests that were committed but never published.

The housekeeping thread of every worker process runs it; a Redis lock lets one sweep at a time.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from broker_config.settings import Settings
from db.engine import Database
from db.outbox import publish_pending, unpublished
from db.types import utcnow

log = logging.getLogger(__name__)
SWEEP_BATCH = 5000


def sweep_unpublished(db: Database, settings: Settings) -> int:
    """Publish every request committed more than the grace ago and still unpublished."""
    total = 0
    while True:
        with db.session() as session:
            pending = unpublished(
                session,
                created_before=utcnow() - timedelta(seconds=settings.publish_grace_s),
                limit=SWEEP_BATCH,
            )
        if not pending:
            return total
        total += publish_pending(db, pending)
        log.info("publisher sweep: published %d request(s) that had not been", len(pending))
