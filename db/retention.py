"""How long uploaded files and batch results are kept, and the purge that enforces it.

``HEADRACE_FILE_RETENTION_DAYS`` (30 by default) after a batch ends, its requests' payloads are
purged: ``body`` (the prompt) becomes ``{}``, ``response`` and ``error`` become NULL. Every cost
row stays whole: each request's status, deployment, attempt count, tokens and cost, every attempt
row, and the batch's counters, so any period's bill can still be rebuilt and explained. Uploaded
files (inputs of OpenAI-compatible batches) are deleted once they expire: at their own
``expires_at`` (an upload may ask for less) or ``HEADRACE_FILE_RETENTION_DAYS`` after upload,
whichever is first.

The API treats results and files as gone from the moment they are due, whether or not the purge
has run yet (``results_purged``, ``file_expired``): what a client sees does not depend on when the
housekeeper last ran. A purged batch's results answer 410 Gone on every door; an expired file is
404 like any unknown file.

``purge_expired`` is idempotent and works in bounded steps: files are deleted ``chunk_rows`` at a
time, requests cleared ``chunk_rows`` at a time in input order, each step its own transaction, so
no statement touches more than ``chunk_rows`` rows. Batches are visited in id order (ids sort by
creation time); the report's ``next_from_id`` is the first batch not yet due, so a caller that
passes it back next time skips everything already done.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, delete, null, or_, select, update
from sqlalchemy.orm import Session

from broker_config.settings import Settings
from db.engine import Database
from db.models import Batch, File, LlmRequest
from db.types import utcnow

log = logging.getLogger(__name__)
DEFAULT_CHUNK_ROWS = 500
SUGGESTED_INTERVAL_S = 3600.0  # files expire by the day: an hourly purge keeps them at most an hour over
_BATCH_PAGE = 200


@dataclass(frozen=True)
class RetentionReport:
    cutoff: datetime  # batches that ended at or before this had their results purged
    files_deleted: int
    batches_purged: int
    requests_cleared: int
    next_from_id: str | None  # pass back as ``from_id``: every batch before it is done


def retention(settings: Settings) -> timedelta:
    return timedelta(days=settings.file_retention_days)


def results_cutoff(settings: Settings, now: datetime) -> datetime:
    return now - retention(settings)


def results_purged(batch: Batch, settings: Settings, now: datetime | None = None) -> bool:
    """Whether the batch's results are past keeping (purged, or about to be)."""
    cutoff = results_cutoff(settings, now or utcnow())
    return batch.ended_at is not None and batch.ended_at <= cutoff


def file_expired(settings: Settings, now: datetime | None = None) -> ColumnElement[bool]:
    """SQL: the uploaded file is past keeping."""
    now = now or utcnow()
    return or_(File.expires_at <= now, File.created_at <= now - retention(settings))


def purge_expired(
    db: Database,
    settings: Settings,
    now: datetime | None = None,
    *,
    from_id: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> RetentionReport:
    """Delete expired uploaded files and clear the payloads of batches that ended more than
    ``HEADRACE_FILE_RETENTION_DAYS`` ago, keeping every cost row. Safe to run again at any time,
    from any number of processes at once (each step is idempotent)."""
    now = now or utcnow()
    cutoff = results_cutoff(settings, now)
    files = _delete_expired_files(db, settings, now, chunk_rows)
    batches = cleared = 0
    next_from_id: str | None = None
    for batch_id, ended_at in _batches_from(db, from_id):
        if ended_at is None or ended_at > cutoff:
            next_from_id = next_from_id or batch_id
            continue
        done = _clear_batch(db, batch_id, chunk_rows)
        if done is not None:
            batches, cleared = batches + 1, cleared + done
    if files or batches:
        log.info("retention: %d file(s) deleted, %d batch(es) purged (%d requests)", files, batches, cleared)
    return RetentionReport(cutoff, files, batches, cleared, next_from_id)


def _delete_expired_files(db: Database, settings: Settings, now: datetime, chunk_rows: int) -> int:
    deleted = 0
    while True:

        def unit(session: Session) -> int:
            ids = list(session.scalars(select(File.id).where(file_expired(settings, now)).limit(chunk_rows)))
            if ids:
                session.execute(delete(File).where(File.id.in_(ids)))
            return len(ids)

        done = db.transact(unit)
        deleted += done
        if done < chunk_rows:
            return deleted


def _batches_from(db: Database, from_id: str | None) -> Iterator[tuple[str, datetime | None]]:
    """(id, ended_at) of every batch from ``from_id`` on, in id order, read a page at a time."""
    after, inclusive = from_id or "", from_id is not None
    while True:
        query = select(Batch.id, Batch.ended_at).order_by(Batch.id).limit(_BATCH_PAGE)
        query = query.where(Batch.id >= after if inclusive else Batch.id > after)
        with db.session() as session:
            page = [(row.id, row.ended_at) for row in session.execute(query)]
        yield from page
        if len(page) < _BATCH_PAGE:
            return
        after, inclusive = page[-1][0], False


def _already_cleared(db: Database, batch_id: str) -> bool:
    """Requests are cleared in input order, so the last one cleared means all were."""
    with db.session() as session:
        last = session.execute(
            select(LlmRequest.body, LlmRequest.response, LlmRequest.error)
            .where(LlmRequest.batch_id == batch_id)
            .order_by(LlmRequest.line_no.desc())
            .limit(1)
        ).first()
    return last is None or (last.body == {} and last.response is None and last.error is None)


def _clear_batch(db: Database, batch_id: str, chunk_rows: int) -> int | None:
    """Clear the batch's request payloads, ``chunk_rows`` per transaction; None if already done."""
    if _already_cleared(db, batch_id):
        return None
    cleared, last_line = 0, -1
    while True:
        with db.session() as session:
            chunk = session.execute(
                select(LlmRequest.id, LlmRequest.line_no)
                .where(LlmRequest.batch_id == batch_id, LlmRequest.line_no > last_line)
                .order_by(LlmRequest.line_no)
                .limit(chunk_rows)
            ).all()
        if not chunk:
            return cleared
        ids = [row.id for row in chunk]

        def unit(session: Session, ids: list[str] = ids) -> None:
            session.execute(
                update(LlmRequest)
                .where(LlmRequest.id.in_(ids))
                .values(body={}, response=null(), error=null())
                .execution_options(synchronize_session=False)
            )

        db.transact(unit)
        cleared += len(ids)
        last_line = chunk[-1].line_no
