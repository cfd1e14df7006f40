"""Files uploaded through the OpenAI-compatible Files API, and the virtual output files of batches.

An uploaded file is kept whole in the ledger (every API process must see it; batch inputs are at
most ``HEADRACE_MAX_BATCH_BYTES``). A batch's output and error files are not stored: their ids
name the batch, and their content is streamed from its requests when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from api.errors import ApiError, not_found
from db.engine import Database
from db.ids import new_id
from db.models import Batch, File
from db.types import utcnow

OUTPUT_PREFIX, ERROR_PREFIX = "file-out-", "file-err-"
BATCH_FILE_TTL_S = 30 * 24 * 3600  # OpenAI keeps batch files 30 days by default


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


def store_file(db: Database, tenant_id: str, filename: str, purpose: str, content: bytes) -> File:
    now = utcnow()
    file = File(
        id=new_id("file"),
        tenant_id=tenant_id,
        filename=filename,
        purpose=purpose,
        size_bytes=len(content),
        created_at=now,
        expires_at=now + timedelta(seconds=BATCH_FILE_TTL_S),
        content=content,
    )
    db.transact(lambda session: session.add(file))
    return file


def find_file(
    session: Session, tenant_id: str, file_id: str, *, with_content: bool = False
) -> File | BatchFile:
    """The tenant's uploaded file, or a batch's output/error file; 404 otherwise."""
    for prefix, kind in ((OUTPUT_PREFIX, "output"), (ERROR_PREFIX, "error")):
        if file_id.startswith(prefix):
            batch = session.get(Batch, "batch_" + file_id.removeprefix(prefix))
            if batch is None or batch.tenant_id != tenant_id or batch.ended_at is None:
                raise not_found("file", file_id)
            return BatchFile(batch, kind)
    query = select(File).where(File.id == file_id, File.tenant_id == tenant_id)
    if with_content:
        query = query.options(undefer(File.content))
    file = session.scalars(query).one_or_none()
    if file is None:
        raise not_found("file", file_id)
    return file


def list_files(
    session: Session, tenant_id: str, *, limit: int, after: str | None, ascending: bool, purpose: str | None
) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id)
    if purpose:
        query = query.where(File.purpose == purpose)
    if after:
        query = query.where(File.id > after if ascending else File.id < after)
    query = query.order_by(File.id if ascending else File.id.desc()).limit(limit + 1)
    found = list(session.scalars(query))
    return found[:limit], len(found) > limit


def delete_file(db: Database, tenant_id: str, file_id: str) -> None:
    def unit(session: Session) -> None:
        file = find_file(session, tenant_id, file_id)
        if isinstance(file, BatchFile):
            raise ApiError(400, "invalid_request", "a batch's output and error files go with the batch")
        session.delete(file)

    db.transact(unit)
