"""Files uploaded through the OpenAI-compatible Files API, and the virtual output files of batches.

An uploaded file is kept whole in the ledger (every API process must see it; batch inputs are at
most ``HEADRACE_MAX_BATCH_BYTES``) until it expires (see db/retention.py); an expired file is
unknown here, whether or not the purge has deleted it yet. A batch's output and error files are not
stored: their ids name the batch, and their content is streamed from its requests when asked for,
until the batch's results are purged (410).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import not_, select
from sqlalchemy.orm import Session, undefer

from api.errors import ApiError, not_found
from broker_config.settings import Settings
from db.engine import Database
from db.ids import new_id
from db.models import Batch, File
from db.retention import file_expired, results_purged
from db.types import utcnow

OUTPUT_PREFIX, ERROR_PREFIX = "file-out-", "file-err-"


@dataclass(frozen=True)
class BatchFile:
    """A batch's output (successful lines) or error file (the rest)."""

    batch: Batch
    kind: str  # "output" | "error"

    @property
    def id(self) -> str:
        return (OUTPUT_PREFIX if self.kind == "output" else ERROR_PREFIX) + self.batch.id.removeprefix(
            "batch_"
        )


def output_file_id(batch: Batch) -> str:
    return BatchFile(batch, "output").id


def error_file_id(batch: Batch) -> str:
    return BatchFile(batch, "error").id


def store_file(
    db: Database, tenant_id: str, filename: str, purpose: str, content: bytes, *, expires_at: datetime
) -> File:
    file = File(
        id=new_id("file"),
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        size_bytes=len(content),
        created_at=utcnow(),
        expires_at=expires_at,
        content=content,
    )
    db.transact(lambda session: session.add(file))
    return file


def results_gone(batch: Batch, settings: Settings) -> ApiError:
    ended = batch.ended_at.astimezone(UTC).isoformat() if batch.ended_at else "?"
    return ApiError(
        410,
        "results_purged",
        f"the results of batch {batch.id} were purged: results are kept "
        f"{settings.file_retention_days} days after a batch ends, and it ended at {ended}",
    )


def ensure_results_kept(batch: Batch, settings: Settings) -> None:
    """410 Gone once the batch's results are past keeping; its counters and costs stay readable."""
    if results_purged(batch, settings):
        raise results_gone(batch, settings)


def find_file(
    session: Session, settings: Settings, tenant_id: str, file_id: str, *, with_content: bool = False
) -> File | BatchFile:
    """The tenant's uploaded file (404 once expired), or a batch's output/error file (410 once
    its results are purged); 404 otherwise."""
    for prefix, kind in ((OUTPUT_PREFIX, "output"), (ERROR_PREFIX, "error")):
        if file_id.startswith(prefix):
            batch = session.get(Batch, "batch_" + file_id.removeprefix(prefix))
            if batch is None or batch.tenant_id != tenant_id or batch.ended_at is None:
                raise not_found("file", file_id)
            ensure_results_kept(batch, settings)
            return BatchFile(batch, kind)
    query = select(File).where(File.id == file_id, File.tenant_id == tenant_id, not_(file_expired(settings)))
    if with_content:
        query = query.options(undefer(File.content))
    file = session.scalars(query).one_or_none()
    if file is None:
        raise ApiError(
            404,
            "not_found",
            f"no file with id {file_id!r} (uploaded files are deleted when they expire, "
            f"{settings.file_retention_days} days after upload at most)",
        )
    return file


def list_files(
    session: Session,
    settings: Settings,
    tenant_id: str,
    *,
    limit: int,
    after: str | None,
    ascending: bool,
    purpose: str | None,
) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id, not_(file_expired(settings)))
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        query = query.where(File.id > after if ascending else File.id < after)
    query = query.order_by(File.id if ascending else File.id.desc()).limit(limit + 1)
    found = list(session.scalars(query))
    return found[:limit], len(found) > limit


def delete_file(db: Database, settings: Settings, tenant_id: str, file_id: str) -> None:
    def unit(session: Session) -> None:
        file = find_file(session, settings, tenant_id, file_id)
        if isinstance(file, BatchFile):
            raise ApiError(400, "invalid_request", "a batch's output and error files go with the batch")
        session.delete(file)

    db.transact(unit)
