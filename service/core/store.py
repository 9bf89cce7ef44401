"""Jobs, events, files metadata and API keys on SQLAlchemy 2. The store is the truth about a
job (not the Celery result backend). SQLite file by default, PostgreSQL via postgresql+psycopg://.

Every method opens its own short transaction and returns detached pydantic records from
domain.py, never ORM objects, so callers (API process, worker processes) cannot lazy-load
or hold sessions.
"""
from __future__ import annotations

import hashlib
import logging
import json
import math
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from service.core import ids
from service.core import webhooks as wh
from service.core.domain import (
    JOB_WEBHOOK_EVENTS,
    ApiKeyInfo,
    DatasetFormat,
    DatasetSource,
    DeliveryStatus,
    FileInfo,
    Job,
    JobError,
    JobEvent,
    JobProgress,
    JobStatus,
    TrainingSpec,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
    can_transition,
)
from service.core.errors import Conflict, InvalidInput, NotFound, UnknownCursor
from service.logging import JOB_LOGGER

# Integer on SQLite so the primary key aliases rowid (autoincrement); BIGINT elsewhere.
_SeqType = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

_job_log = logging.getLogger(JOB_LOGGER)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(sa.types.TypeDecorator):
    """Aware UTC datetimes in and out. SQLite has no time zones, so it stores naive UTC."""
    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON()}


class FileRow(Base):
    __tablename__ = "ts_files"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    tenant: Mapped[str] = mapped_column(sa.String(64), index=True)
    filename: Mapped[str] = mapped_column(sa.String(1024))
    purpose: Mapped[str] = mapped_column(sa.String(64))
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    rows: Mapped[int] = mapped_column(sa.BigInteger)
    format: Mapped[str] = mapped_column(sa.String(32))
    sha256: Mapped[str] = mapped_column(sa.String(64))
    path: Mapped[str] = mapped_column(sa.String(4096))
    created_at: Mapped[datetime]


class JobRow(Base):
    __tablename__ = "ts_jobs"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    tenant: Mapped[str] = mapped_column(sa.String(64))
    model: Mapped[str] = mapped_column(sa.String(1024))
    status: Mapped[str] = mapped_column(sa.String(32), index=True)
    spec: Mapped[dict[str, Any]]
    training_file: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    validation_file: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    training_dataset: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    validation_dataset: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    suffix: Mapped[str | None] = mapped_column(sa.String(64))
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", sa.JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(sa.String(256))
    trained_tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    error: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    progress: Mapped[dict[str, Any]]
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    worker_id: Mapped[str | None] = mapped_column(sa.String(256))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    result: Mapped[dict[str, Any]]

    __table_args__ = (sa.Index("ix_ts_jobs_tenant_seq", "tenant", "seq"),)


class IdempotencyKeyRow(Base):
    """A client's Idempotency-Key for a job it created: a retry of the same request (same key,
    same body) is answered with that job instead of creating a second one. A table of its own
    so that existing databases gain it through create_all; it goes with its job."""
    __tablename__ = "ts_idempotency_keys"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(sa.String(64))
    key: Mapped[str] = mapped_column(sa.String(255))
    fingerprint: Mapped[str] = mapped_column(sa.String(64))  # sha256 of the request body
    job_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("ts_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]

    __table_args__ = (sa.UniqueConstraint("tenant", "key", name="uq_ts_idempotency_keys_tenant_key"),)


class EventRow(Base):
    __tablename__ = "ts_job_events"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    job_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("ts_jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime]
    level: Mapped[str] = mapped_column(sa.String(16))
    type: Mapped[str] = mapped_column(sa.String(16))
    message: Mapped[str] = mapped_column(sa.Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)

    __table_args__ = (sa.Index("ix_ts_job_events_job_seq", "job_id", "seq"),)


class ApiKeyRow(Base):
    __tablename__ = "ts_api_keys"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    tenant: Mapped[str] = mapped_column(sa.String(64), index=True)
    name: Mapped[str | None] = mapped_column(sa.String(256))
    prefix: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class WebhookEndpointRow(Base):
    __tablename__ = "ts_webhook_endpoints"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    tenant: Mapped[str] = mapped_column(sa.String(64))
    name: Mapped[str] = mapped_column(sa.String(256))
    url: Mapped[str] = mapped_column(sa.String(2048))
    event_types: Mapped[list[str]] = mapped_column(sa.JSON)
    secret: Mapped[str] = mapped_column(sa.String(128))
    previous_secret: Mapped[str | None] = mapped_column(sa.String(128))
    previous_secret_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    __table_args__ = (sa.Index("ix_ts_webhook_endpoints_tenant_seq", "tenant", "seq"),)


class WebhookDeliveryRow(Base):
    """The outbox: one row per (event, endpoint), written in the transaction of the job's final
    transition; its id is the stable `webhook-id`."""
    __tablename__ = "ts_webhook_deliveries"
    seq: Mapped[int] = mapped_column(_SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(sa.String(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(
        sa.String(64), sa.ForeignKey("ts_webhook_endpoints.id", ondelete="CASCADE"))
    tenant: Mapped[str] = mapped_column(sa.String(64))
    event_id: Mapped[str] = mapped_column(sa.String(64))
    event_type: Mapped[str] = mapped_column(sa.String(64))
    payload: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(sa.Integer)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime]
    delivered_at: Mapped[datetime | None]
    test: Mapped[bool] = mapped_column(sa.Boolean, default=False)

    __table_args__ = (sa.Index("ix_ts_webhook_deliveries_due", "status", "next_attempt_at"),
                      sa.Index("ix_ts_webhook_deliveries_endpoint_seq", "endpoint_id", "seq"))


# ---------------------------------------------------------------------------------------
# Row -> record
# ---------------------------------------------------------------------------------------
def _newest_first_page(session, row_type, scope, after: str | None, limit: int, *, what: str):
    """Keyset pagination on the insertion sequence (ties in timestamps cannot reorder pages):
    rows within `scope` older than the `after` row, newest first, and whether more exist."""
    limit = max(1, int(limit))
    q = sa.select(row_type).where(scope)
    if after is not None:
        cursor = session.execute(
            sa.select(row_type.seq).where(row_type.id == after, scope)).scalar_one_or_none()
        if cursor is None:
            raise UnknownCursor(what, after)
        q = q.where(row_type.seq < cursor)
    rows = list(session.execute(q.order_by(row_type.seq.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def _file(row: FileRow) -> FileInfo:
    return FileInfo(id=row.id, tenant=row.tenant, filename=row.filename, purpose=row.purpose,
                    bytes=row.bytes, rows=row.rows, format=DatasetFormat(row.format) if row.format else None,
                    sha256=row.sha256, path=row.path, created_at=row.created_at)


def _job(row: JobRow) -> Job:
    return Job(
        id=row.id, tenant=row.tenant, model=row.model, status=JobStatus(row.status),
        spec=TrainingSpec.model_validate(row.spec),
        training_file=row.training_file, validation_file=row.validation_file,
        training_dataset=DatasetSource.model_validate(row.training_dataset) if row.training_dataset else None,
        validation_dataset=DatasetSource.model_validate(row.validation_dataset) if row.validation_dataset else None,
        suffix=row.suffix, metadata=row.job_metadata, fine_tuned_model=row.fine_tuned_model,
        trained_tokens=row.trained_tokens,
        error=JobError.model_validate(row.error) if row.error else None,
        progress=JobProgress.model_validate(row.progress or {}),
        cancel_requested=bool(row.cancel_requested), worker_id=row.worker_id, attempts=row.attempts or 0,
        heartbeat_at=row.heartbeat_at, created_at=row.created_at, started_at=row.started_at,
        finished_at=row.finished_at, result=dict(row.result or {}),
    )


def _new_job_row(*, tenant: str, model: str, spec: TrainingSpec, training_file: str | None = None,
                 validation_file: str | None = None, training_dataset: DatasetSource | None = None,
                 validation_dataset: DatasetSource | None = None, suffix: str | None = None,
                 metadata: dict[str, str] | None = None, status: JobStatus = JobStatus.queued) -> JobRow:
    return JobRow(
        id=ids.job_id(), tenant=tenant, model=model, status=JobStatus(status).value,
        spec=spec.model_dump(mode="json"), training_file=training_file, validation_file=validation_file,
        training_dataset=training_dataset.model_dump(mode="json") if training_dataset else None,
        validation_dataset=validation_dataset.model_dump(mode="json") if validation_dataset else None,
        suffix=suffix, job_metadata=dict(metadata) if metadata is not None else None,
        progress=JobProgress().model_dump(mode="json"), cancel_requested=False, attempts=0,
        created_at=utcnow(), result={},
    )


def _event(row: EventRow) -> JobEvent:
    return JobEvent(id=row.id, job_id=row.job_id, created_at=row.created_at, level=row.level,
                    type=row.type, message=row.message, data=row.data)


def _api_key(row: ApiKeyRow) -> ApiKeyInfo:
    return ApiKeyInfo(id=row.id, tenant=row.tenant, name=row.name, prefix=row.prefix,
                      created_at=row.created_at, revoked_at=row.revoked_at)


def _webhook_endpoint(row: WebhookEndpointRow) -> WebhookEndpoint:
    return WebhookEndpoint(id=row.id, tenant=row.tenant, name=row.name, url=row.url,
                           event_types=[WebhookEventType(t) for t in row.event_types], secret=row.secret,
                           previous_secret=row.previous_secret,
                           previous_secret_expires_at=row.previous_secret_expires_at,
                           created_at=row.created_at, updated_at=row.updated_at)


def _webhook_delivery(row: WebhookDeliveryRow) -> WebhookDelivery:
    return WebhookDelivery(id=row.id, endpoint_id=row.endpoint_id, tenant=row.tenant, event_id=row.event_id,
                           event_type=WebhookEventType(row.event_type), payload=row.payload,
                           status=DeliveryStatus(row.status), attempts=row.attempts or 0,
                           next_attempt_at=row.next_attempt_at, last_attempt_at=row.last_attempt_at,
                           last_status_code=row.last_status_code, last_error=row.last_error,
                           created_at=row.created_at, delivered_at=row.delivered_at, test=bool(row.test))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _json_safe(value: Any) -> Any:
    """NaN/Infinity -> null: PostgreSQL's json type refuses them, and a diverged run logs a NaN loss."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _json_dumps(value: Any) -> str:
    return json.dumps(_json_safe(value), ensure_ascii=False, allow_nan=False)


def normalize_url(url: str) -> str:
    """`postgresql://` / `postgres://` mean psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


# Any constant; serializes create_all between processes starting at once on PostgreSQL.
_DDL_LOCK_ID = 0x7475_6E65


# SQLite connections kept per engine (see _sqlite_engines).
POOL_SIZE = 40


class Store:
    def __init__(self, url: str, *, echo: bool = False):
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            self._engine, self._read_engine = self._sqlite_engines(parsed, echo)
        else:
            self._engine = sa.create_engine(self.url, echo=echo, pool_pre_ping=True, json_serializer=_json_dumps)
            self._read_engine = self._engine
        # SQLite takes one writer at a time; threads of this process that all BEGIN IMMEDIATE
        # at once wait in its busy handler, which polls with sleeps of up to 100 ms (what made
        # job submission's p99 under 50 clients). Queued on a lock here, they are handed the
        # write lock the moment it frees; other processes still meet busy_timeout.
        self._write_lock: threading.RLock | nullcontext = (
            threading.RLock() if self.dialect == "sqlite" else nullcontext())
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)
        with self._engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _DDL_LOCK_ID})
            Base.metadata.create_all(conn)

    # -- engines ---------------------------------------------------------------------------
    @staticmethod
    def _sqlite_engines(parsed, echo: bool) -> tuple[Engine, Engine]:
        """Two engines on one file: writes start with BEGIN IMMEDIATE (take the write lock up
        front, so a read-then-write never fails with SQLITE_BUSY when another process committed
        in between; busy_timeout then simply waits), reads with a plain deferred BEGIN."""
        database = parsed.database or ""
        memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not memory:
            Path(database).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)

        def make(begin_sql: str) -> Engine:
            kwargs: dict[str, Any] = {"echo": echo, "json_serializer": _json_dumps,
                                      "connect_args": {"check_same_thread": False, "timeout": 30}}
            if memory:
                kwargs["poolclass"] = StaticPool
            else:
                # As many kept connections as the API's threadpool runs requests (anyio's 40):
                # past pool_size each checkout opened a new connection and ran the PRAGMAs.
                kwargs.update(pool_size=POOL_SIZE, max_overflow=POOL_SIZE)
            engine = sa.create_engine(parsed, **kwargs)

            @sa_event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn, _record):
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
                cur = dbapi_conn.cursor()
                if not memory:
                    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                cur.execute("PRAGMA busy_timeout=30000")  # API and worker processes share the file
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()

            @sa_event.listens_for(engine, "begin")
            def _on_begin(conn):
                conn.exec_driver_sql(begin_sql)

            return engine

        write = make("BEGIN IMMEDIATE")
        # An in-memory database exists once per connection: one engine must serve both.
        return (write, write) if memory else (write, make("BEGIN"))

    def ping(self) -> bool:
        """True when the database answers (for /readyz)."""
        try:
            with self._read_engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    def close(self) -> None:
        self._engine.dispose()
        if self._read_engine is not self._engine:
            self._read_engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self._write_lock, self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._read_sessions() as session, session.begin():
            yield session

    def _lock_job(self, s: Session, job_id: str) -> JobRow:
        # FOR UPDATE on PostgreSQL; SQLite already holds the write lock (BEGIN IMMEDIATE).
        row = s.execute(sa.select(JobRow).where(JobRow.id == job_id).with_for_update()).scalar_one_or_none()
        if row is None:
            raise NotFound(f"job {job_id!r} not found", param="job_id")
        return row

    # =====================================================================================
    # Files
    # =====================================================================================
    def create_file(self, *, tenant: str, filename: str, purpose: str, bytes: int, rows: int,
                    format: DatasetFormat | None, sha256: str, path: str | Path) -> FileInfo:
        # "" for a file that is no dataset: the column predates such files and is NOT NULL.
        row = FileRow(id=ids.file_id(), tenant=tenant, filename=filename, purpose=purpose, bytes=bytes,
                      rows=rows, format=DatasetFormat(format).value if format else "", sha256=sha256, path=str(path),
                      created_at=utcnow())
        with self._write() as s:
            s.add(row)
            s.flush()
            return _file(row)

    def get_file(self, file_id: str, tenant: str | None) -> FileInfo:
        """Another tenant's file answers NotFound too; tenant None (workers) sees every file."""
        with self._read() as s:
            row = s.execute(sa.select(FileRow).where(FileRow.id == file_id)).scalar_one_or_none()
            if row is None or (tenant is not None and row.tenant != tenant):
                raise NotFound(f"file {file_id!r} not found", param="file_id")
            return _file(row)

    def list_files(self, tenant: str, purpose: str | None = None) -> list[FileInfo]:
        q = sa.select(FileRow).where(FileRow.tenant == tenant)
        if purpose is not None:
            q = q.where(FileRow.purpose == purpose)
        with self._read() as s:
            return [_file(r) for r in s.execute(q.order_by(FileRow.seq.desc())).scalars()]

    def delete_file(self, file_id: str, tenant: str) -> FileInfo:
        """Deletes the row and returns it (the caller removes the bytes on disk)."""
        with self._write() as s:
            row = s.execute(sa.select(FileRow).where(FileRow.id == file_id)).scalar_one_or_none()
            if row is None or row.tenant != tenant:
                raise NotFound(f"file {file_id!r} not found", param="file_id")
            active = s.execute(
                sa.select(JobRow.id).where(
                    sa.or_(JobRow.training_file == file_id, JobRow.validation_file == file_id),
                    JobRow.status.not_in([st.value for st in JobStatus if st.is_final]),
                ).limit(1)
            ).scalar_one_or_none()
            if active is not None:
                raise Conflict(f"file {file_id!r} is used by job {active} which has not finished",
                               param="file_id")
            info = _file(row)
            s.delete(row)
            return info

    # =====================================================================================
    # Jobs
    # =====================================================================================
    def create_job(self, *, tenant: str, model: str, spec: TrainingSpec, training_file: str | None = None,
                   validation_file: str | None = None, training_dataset: DatasetSource | None = None,
                   validation_dataset: DatasetSource | None = None, suffix: str | None = None,
                   metadata: dict[str, str] | None = None, status: JobStatus = JobStatus.queued) -> Job:
        row = _new_job_row(tenant=tenant, model=model, spec=spec, training_file=training_file,
                           validation_file=validation_file, training_dataset=training_dataset,
                           validation_dataset=validation_dataset, suffix=suffix, metadata=metadata, status=status)
        with self._write() as s:
            s.add(row)
            s.flush()
            job = _job(row)
        _job_log.info("job %s: created (%s)", job.id, job.status.value, extra={"job_id": job.id})
        return job

    def create_job_once(self, *, idempotency_key: str, fingerprint: str, tenant: str, **job: Any) -> tuple[Job, bool]:
        """create_job, unless this tenant already created a job with `idempotency_key`: then that
        job (as it is now) and False. The same key with another request body (`fingerprint`) is a
        Conflict: a key names one request."""
        for _ in range(2):
            try:
                with self._write() as s:
                    found = self._job_for_key(s, tenant, idempotency_key, fingerprint)
                    if found is not None:
                        return found, False
                    row = _new_job_row(tenant=tenant, **job)
                    s.add(row)
                    s.flush()
                    s.add(IdempotencyKeyRow(tenant=tenant, key=idempotency_key, fingerprint=fingerprint,
                                            job_id=row.id, created_at=row.created_at))
                    s.flush()
                    return _job(row), True
            except SAIntegrityError:
                # Another process committed this key in between (PostgreSQL; SQLite writers are
                # serialized): this transaction rolled back, and the next pass reads theirs.
                continue
        raise Conflict("the idempotency key is being used by a concurrent request", param="Idempotency-Key",
                       code="idempotency_key_in_use")  # pragma: no cover - their row vanished (rolled back)

    @staticmethod
    def _job_for_key(s: Session, tenant: str, key: str, fingerprint: str) -> Job | None:
        found = s.execute(sa.select(IdempotencyKeyRow, JobRow).join(JobRow, JobRow.id == IdempotencyKeyRow.job_id)
                          .where(IdempotencyKeyRow.tenant == tenant, IdempotencyKeyRow.key == key)).one_or_none()
        if found is None:
            return None
        key_row, job_row = found
        if key_row.fingerprint != fingerprint:
            raise Conflict(f"Idempotency-Key {key!r} was used for a different request (job {job_row.id}); "
                           "use a new key for a new request", param="Idempotency-Key", code="idempotency_key_reused")
        return _job(job_row)

    def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        with self._read() as s:
            row = s.execute(sa.select(JobRow).where(JobRow.id == job_id)).scalar_one_or_none()
            if row is None or (tenant is not None and row.tenant != tenant):
                raise NotFound(f"job {job_id!r} not found", param="job_id")
            return _job(row)

    def list_jobs(self, tenant: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        """Newest first. `after` is the id of the last job of the previous page."""
        with self._read() as s:
            rows, has_more = _newest_first_page(s, JobRow, JobRow.tenant == tenant, after, limit, what="job")
            return [_job(r) for r in rows], has_more

    def transition(self, job_id: str, new: JobStatus, *, error: JobError | None = None,
                   fine_tuned_model: str | None = None, worker_id: str | None = None,
                   result: dict | None = None) -> Job:
        """Atomic compare-and-set of the status. Illegal transitions (domain.TRANSITIONS),
        including losing a race to another writer, raise Conflict.

        running: started_at (first time only), attempts += 1, heartbeat_at = now.
        final states: finished_at. `result` is shallow-merged into job.result."""
        new = JobStatus(new)
        for _ in range(5):
            with self._write() as s:
                row = self._lock_job(s, job_id)
                old = JobStatus(row.status)
                if not can_transition(old, new):
                    raise Conflict(f"job {job_id} cannot go from {old.value} to {new.value}",
                                   param="status", code="invalid_transition")
                now = utcnow()
                values: dict[str, Any] = {"status": new.value}
                if new is JobStatus.running:
                    values["attempts"] = JobRow.attempts + 1
                    values["started_at"] = row.started_at or now
                    values["heartbeat_at"] = now
                if new.is_final:
                    values["finished_at"] = now
                if error is not None:
                    values["error"] = error.model_dump(mode="json")
                if fine_tuned_model is not None:
                    values["fine_tuned_model"] = fine_tuned_model
                if worker_id is not None:
                    values["worker_id"] = worker_id
                if result:
                    values["result"] = {**(row.result or {}), **result}
                # The WHERE on the old status is the compare-and-set: a writer that slipped in
                # between (possible where FOR UPDATE is not available) makes rowcount 0.
                res = s.execute(sa.update(JobRow).where(JobRow.id == job_id, JobRow.status == old.value)
                                .values(**values).execution_options(synchronize_session=False))
                done = None
                if res.rowcount == 1:
                    self._outbox_job_event(s, row.tenant, job_id, new, now)
                    s.flush()
                    s.expire(row)
                    done = _job(s.execute(sa.select(JobRow).where(JobRow.id == job_id)).scalar_one())
            if done is not None:  # committed: say so (the one line per transition `make run` shows)
                _job_log.info("job %s: %s -> %s%s", job_id, old.value, new.value,
                              f" ({done.fine_tuned_model})" if new is JobStatus.succeeded and done.fine_tuned_model
                              else f" ({done.error.code}: {done.error.message})" if done.error and new.is_final
                              else "", extra={"job_id": job_id, "status": new.value})
                return done
            time.sleep(0.01)
        raise Conflict(f"job {job_id}: status changed concurrently, giving up", param="status",
                       code="invalid_transition")

    def delete_job(self, job_id: str) -> None:
        """Undo a job whose enqueue failed (no orphan rows: its events go too)."""
        with self._write() as s:
            s.execute(sa.delete(EventRow).where(EventRow.job_id == job_id))
            s.execute(sa.delete(IdempotencyKeyRow).where(IdempotencyKeyRow.job_id == job_id))
            s.execute(sa.delete(JobRow).where(JobRow.id == job_id))

    def update_progress(self, job_id: str, progress: JobProgress, *, trained_tokens: int | None = None) -> None:
        values: dict[str, Any] = {"progress": progress.model_dump(mode="json")}
        if trained_tokens is not None:
            values["trained_tokens"] = trained_tokens
        with self._write() as s:
            res = s.execute(sa.update(JobRow).where(JobRow.id == job_id).values(**values))
            if res.rowcount == 0:
                raise NotFound(f"job {job_id!r} not found", param="job_id")

    # -- events ----------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, *, level: str = "info", type: str = "message",
                  data: dict | None = None) -> JobEvent:
        ev = JobEvent(id=ids.event_id(), job_id=job_id, created_at=utcnow(), level=level, type=type,
                      message=message, data=data)
        with self._write() as s:
            exists = s.execute(sa.select(JobRow.seq).where(JobRow.id == job_id)).scalar_one_or_none()
            if exists is None:
                raise NotFound(f"job {job_id!r} not found", param="job_id")
            s.add(EventRow(id=ev.id, job_id=job_id, created_at=ev.created_at, level=ev.level, type=ev.type,
                           message=ev.message, data=ev.data))
        return ev

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[JobEvent], bool]:
        """Newest first, like OpenAI; `after` is the id of the last event of the previous page."""
        with self._read() as s:
            rows, has_more = _newest_first_page(s, EventRow, EventRow.job_id == job_id, after, limit,
                                                what="event of this job")
            return [_event(r) for r in rows], has_more

    def all_events(self, job_id: str) -> list[JobEvent]:
        """Oldest first (loss curves)."""
        with self._read() as s:
            q = sa.select(EventRow).where(EventRow.job_id == job_id).order_by(EventRow.seq)
            return [_event(r) for r in s.execute(q).scalars()]

    # -- cancel / liveness -----------------------------------------------------------------
    def request_cancel(self, job_id: str, tenant: str) -> Job:
        """queued/validating_files -> cancelled at once; running -> cancel_requested (the worker
        stops at its next step and moves the job to cancelled); final -> Conflict."""
        with self._write() as s:
            row = self._lock_job(s, job_id)
            if row.tenant != tenant:
                raise NotFound(f"job {job_id!r} not found", param="job_id")
            status = JobStatus(row.status)
            if status.is_final:
                raise Conflict(f"job {job_id} is already {status.value}", param="job_id")
            values: dict[str, Any] = {"cancel_requested": True}
            now = utcnow()
            if status is not JobStatus.running:
                values.update(status=JobStatus.cancelled.value, finished_at=now)
            res = s.execute(sa.update(JobRow).where(JobRow.id == job_id, JobRow.status == status.value)
                            .values(**values))
            if res.rowcount != 1:  # pragma: no cover - the row lock makes this unreachable
                raise Conflict(f"job {job_id}: status changed concurrently", param="job_id")
            if status is not JobStatus.running:
                self._outbox_job_event(s, row.tenant, job_id, JobStatus.cancelled, now)
            s.flush()
            s.expire(row)
            job = _job(s.execute(sa.select(JobRow).where(JobRow.id == job_id)).scalar_one())
        _job_log.info("job %s: %s", job_id, f"{status.value} -> cancelled" if job.status is JobStatus.cancelled
                      else "cancel requested (stops at its next step)", extra={"job_id": job_id})
        return job

    def is_cancel_requested(self, job_id: str) -> bool:
        with self._read() as s:
            row = s.execute(sa.select(JobRow.cancel_requested, JobRow.status)
                            .where(JobRow.id == job_id)).one_or_none()
            if row is None:
                raise NotFound(f"job {job_id!r} not found", param="job_id")
            return bool(row.cancel_requested) or row.status == JobStatus.cancelled.value

    def heartbeat(self, job_id: str, worker_id: str) -> None:
        with self._write() as s:
            res = s.execute(sa.update(JobRow).where(JobRow.id == job_id)
                            .values(heartbeat_at=utcnow(), worker_id=worker_id))
            if res.rowcount == 0:
                raise NotFound(f"job {job_id!r} not found", param="job_id")

    def stale_running_jobs(self, older_than_s: float) -> list[Job]:
        """Running jobs whose last heartbeat is older than `older_than_s` (or missing)."""
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        q = (sa.select(JobRow).where(JobRow.status == JobStatus.running.value,
                                     sa.or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff))
             .order_by(JobRow.seq))
        with self._read() as s:
            return [_job(r) for r in s.execute(q).scalars()]

    def job_ids_with_status(self, statuses: Iterable[JobStatus]) -> list[str]:
        """Oldest first; ids only (the reapers' sweep of every queued job, each second, must not
        build a full Job per row while a thousand jobs wait)."""
        values = [JobStatus(st).value for st in statuses]
        if not values:
            return []
        with self._read() as s:
            q = sa.select(JobRow.id).where(JobRow.status.in_(values)).order_by(JobRow.seq)
            return list(s.execute(q).scalars())

    def jobs_with_status(self, statuses: Iterable[JobStatus]) -> list[Job]:
        """Oldest first."""
        values = [JobStatus(st).value for st in statuses]
        if not values:
            return []
        with self._read() as s:
            q = sa.select(JobRow).where(JobRow.status.in_(values)).order_by(JobRow.seq)
            return [_job(r) for r in s.execute(q).scalars()]

    def count_jobs_by_status(self) -> dict[str, int]:
        """Every status present, zero included (metrics want stable label sets)."""
        counts = {st.value: 0 for st in JobStatus}
        with self._read() as s:
            for status, n in s.execute(sa.select(JobRow.status, sa.func.count()).group_by(JobRow.status)):
                counts[status] = int(n)
        return counts

    # =====================================================================================
    # API keys (sha256 hashes only; the plaintext is returned once)
    # =====================================================================================
    def create_api_key(self, tenant: str, *, name: str | None = None, key: str | None = None) -> tuple[str, ApiKeyInfo]:
        """Idempotent for a given key (startup hashes TUNESERVE_API_KEYS in every process);
        a revoked key stays revoked; the same key for another tenant is a Conflict."""
        key = key if key is not None else "ts-" + secrets.token_urlsafe(32)
        if not key or len(key) > 512 or not all("!" <= ch <= "~" for ch in key):
            # The API takes a key only as visible ASCII with nothing around it (deps.bearer_key).
            raise InvalidInput("api key must be 1..512 visible ASCII characters, no whitespace", param="key")
        digest = hash_key(key)
        for _ in range(2):
            with self._read() as s:
                row = s.execute(sa.select(ApiKeyRow).where(ApiKeyRow.key_hash == digest)).scalar_one_or_none()
                if row is not None:
                    if row.tenant != tenant:
                        raise Conflict("this api key already belongs to another tenant", param="key")
                    return key, _api_key(row)
            try:
                row = ApiKeyRow(id=ids.new_id(ids.API_KEY_PREFIX), key_hash=digest, tenant=tenant, name=name,
                                prefix=key[:8], created_at=utcnow(), revoked_at=None)
                with self._write() as s:
                    s.add(row)
                    s.flush()
                    return key, _api_key(row)
            except SAIntegrityError:
                continue  # another process inserted the same key at the same time: read it back
        raise Conflict("could not store the api key", param="key")  # pragma: no cover

    def tenant_for_key(self, key: str) -> str | None:
        if not key:
            return None
        with self._read() as s:
            row = s.execute(sa.select(ApiKeyRow.tenant, ApiKeyRow.revoked_at)
                            .where(ApiKeyRow.key_hash == hash_key(key))).one_or_none()
            if row is None or row.revoked_at is not None:
                return None
            return row.tenant

    def list_api_keys(self, tenant: str | None = None) -> list[ApiKeyInfo]:
        q = sa.select(ApiKeyRow)
        if tenant is not None:
            q = q.where(ApiKeyRow.tenant == tenant)
        with self._read() as s:
            return [_api_key(r) for r in s.execute(q.order_by(ApiKeyRow.seq)).scalars()]

    def revoke_api_key(self, key_id: str) -> ApiKeyInfo:
        with self._write() as s:
            row = s.execute(sa.select(ApiKeyRow).where(ApiKeyRow.id == key_id)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"api key {key_id!r} not found", param="key_id")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                s.flush()
            return _api_key(row)

    # =====================================================================================
    # Webhook endpoints and their outbox
    # =====================================================================================
    @staticmethod
    def _outbox_job_event(s: Session, tenant: str, job_id: str, status: JobStatus, now: datetime) -> None:
        """Inside the transition's own transaction: one delivery row per endpoint of the tenant
        subscribed to the event, so the event exists exactly when the transition committed."""
        event_type = JOB_WEBHOOK_EVENTS.get(status)
        if event_type is None:
            return
        endpoints = s.execute(sa.select(WebhookEndpointRow.id, WebhookEndpointRow.event_types)
                              .where(WebhookEndpointRow.tenant == tenant)).all()
        targets = [ep_id for ep_id, types in endpoints if event_type.value in (types or [])]
        if not targets:
            return
        evt = wh.event_id()
        body = wh.event_body(evt, event_type, int(now.timestamp()), job_id)
        for ep_id in targets:
            s.add(WebhookDeliveryRow(id=wh.delivery_id(), endpoint_id=ep_id, tenant=tenant, event_id=evt,
                                     event_type=event_type.value, payload=body,
                                     status=DeliveryStatus.pending.value, attempts=0, next_attempt_at=now,
                                     created_at=now, test=False))

    def _endpoint_row(self, s: Session, endpoint_id: str, tenant: str, *, lock: bool = False) -> WebhookEndpointRow:
        q = sa.select(WebhookEndpointRow).where(WebhookEndpointRow.id == endpoint_id)
        row = s.execute(q.with_for_update() if lock else q).scalar_one_or_none()
        if row is None or row.tenant != tenant:  # another tenant's endpoint does not exist for you
            raise NotFound(f"webhook endpoint {endpoint_id!r} not found", param="webhook_endpoint_id")
        return row

    def create_webhook_endpoint(self, *, tenant: str, name: str, url: str,
                                event_types: list[WebhookEventType]) -> WebhookEndpoint:
        now = utcnow()
        row = WebhookEndpointRow(id=ids.new_id(ids.WEBHOOK_ENDPOINT_PREFIX), tenant=tenant, name=name, url=url,
                                 event_types=[WebhookEventType(t).value for t in event_types],
                                 secret=wh.new_secret(), previous_secret=None, previous_secret_expires_at=None,
                                 created_at=now, updated_at=now)
        with self._write() as s:
            s.add(row)
            s.flush()
            return _webhook_endpoint(row)

    def get_webhook_endpoint(self, endpoint_id: str, tenant: str) -> WebhookEndpoint:
        with self._read() as s:
            return _webhook_endpoint(self._endpoint_row(s, endpoint_id, tenant))

    def list_webhook_endpoints(self, tenant: str, *, after: str | None = None,
                               limit: int = 20) -> tuple[list[WebhookEndpoint], bool]:
        """Newest first (as OpenAI lists them)."""
        with self._read() as s:
            rows, has_more = _newest_first_page(s, WebhookEndpointRow, WebhookEndpointRow.tenant == tenant,
                                                after, limit, what="webhook endpoint")
            return [_webhook_endpoint(r) for r in rows], has_more

    def update_webhook_endpoint(self, endpoint_id: str, tenant: str, *, name: str | None = None,
                                url: str | None = None,
                                event_types: list[WebhookEventType] | None = None) -> WebhookEndpoint:
        """Only given fields change; updated_at moves only when something did."""
        with self._write() as s:
            row = self._endpoint_row(s, endpoint_id, tenant, lock=True)
            changes: dict[str, Any] = {}
            if name is not None and name != row.name:
                changes["name"] = name
            if url is not None and url != row.url:
                changes["url"] = url
            if event_types is not None:
                types = [WebhookEventType(t).value for t in event_types]
                if types != list(row.event_types or []):
                    changes["event_types"] = types
            if changes:
                for k, v in changes.items():
                    setattr(row, k, v)
                row.updated_at = utcnow()
                s.flush()
            return _webhook_endpoint(row)

    def rotate_webhook_secret(self, endpoint_id: str, tenant: str, *, keep_old_for: timedelta | None = None
                              ) -> WebhookEndpoint:
        """A new secret signs every delivery from now on; the old one also signs for `keep_old_for`."""
        with self._write() as s:
            row = self._endpoint_row(s, endpoint_id, tenant, lock=True)
            now = utcnow()
            if keep_old_for:
                row.previous_secret, row.previous_secret_expires_at = row.secret, now + keep_old_for
            else:
                row.previous_secret, row.previous_secret_expires_at = None, None
            row.secret = wh.new_secret()
            row.updated_at = now
            s.flush()
            return _webhook_endpoint(row)

    def delete_webhook_endpoint(self, endpoint_id: str, tenant: str) -> WebhookEndpoint:
        """The endpoint and its outbox rows go together: nothing is sent to it afterwards."""
        with self._write() as s:
            row = self._endpoint_row(s, endpoint_id, tenant, lock=True)
            info = _webhook_endpoint(row)
            s.execute(sa.delete(WebhookDeliveryRow).where(WebhookDeliveryRow.endpoint_id == endpoint_id))
            s.delete(row)
            return info

    def record_test_delivery(self, endpoint: WebhookEndpoint, *, msg_id: str, event_id: str,
                             event_type: WebhookEventType, payload: str, status_code: int | None,
                             error: str | None) -> WebhookDelivery:
        """The log entry of a one-off test send (already attempted; never retried)."""
        now = utcnow()
        ok = status_code is not None and 200 <= status_code < 300
        with self._write() as s:
            self._endpoint_row(s, endpoint.id, endpoint.tenant)
            row = WebhookDeliveryRow(
                id=msg_id, endpoint_id=endpoint.id, tenant=endpoint.tenant, event_id=event_id,
                event_type=WebhookEventType(event_type).value, payload=payload,
                status=(DeliveryStatus.succeeded if ok else DeliveryStatus.failed).value, attempts=1,
                next_attempt_at=None, last_attempt_at=now, last_status_code=status_code, last_error=error,
                created_at=now, delivered_at=now if ok else None, test=True)
            s.add(row)
            s.flush()
            return _webhook_delivery(row)

    def claim_due_deliveries(self, now: datetime, *, limit: int, lease: timedelta
                             ) -> list[tuple[WebhookDelivery, WebhookEndpoint]]:
        """Take up to `limit` pending deliveries due at `now` for one send each: attempts += 1 and
        next_attempt_at = now + lease, in one transaction, so concurrent senders never take the
        same row and a sender that dies mid-send leaves it due again after the lease."""
        q = (sa.select(WebhookDeliveryRow)
             .where(WebhookDeliveryRow.status == DeliveryStatus.pending.value,
                    WebhookDeliveryRow.next_attempt_at <= now)
             .order_by(WebhookDeliveryRow.next_attempt_at, WebhookDeliveryRow.seq)
             .limit(max(1, int(limit))))
        if self.dialect == "postgresql":
            q = q.with_for_update(skip_locked=True)
        out: list[tuple[WebhookDelivery, WebhookEndpoint]] = []
        with self._write() as s:
            rows = list(s.execute(q).scalars())
            endpoints = {r.id: r for r in s.execute(sa.select(WebhookEndpointRow).where(
                WebhookEndpointRow.id.in_({row.endpoint_id for row in rows}))).scalars()} if rows else {}
            for row in rows:
                row.attempts = (row.attempts or 0) + 1
                row.last_attempt_at = now
                row.next_attempt_at = now + lease
                out.append((_webhook_delivery(row), _webhook_endpoint(endpoints[row.endpoint_id])))
            s.flush()
        return out

    def finish_delivery_attempt(self, delivery_id: str, *, status_code: int | None, error: str | None,
                                now: datetime, retry_at: datetime | None) -> WebhookDelivery | None:
        """Record one attempt's outcome: 2xx -> succeeded; else pending again at `retry_at`, or
        failed when `retry_at` is None. None when the row is gone (its endpoint was deleted)."""
        ok = status_code is not None and 200 <= status_code < 300
        with self._write() as s:
            row = s.execute(sa.select(WebhookDeliveryRow).where(WebhookDeliveryRow.id == delivery_id)
                            .with_for_update()).scalar_one_or_none()
            if row is None:
                return None
            row.last_status_code, row.last_error = status_code, error
            if ok:
                row.status, row.delivered_at, row.next_attempt_at = DeliveryStatus.succeeded.value, now, None
            elif retry_at is None:
                row.status, row.next_attempt_at = DeliveryStatus.failed.value, None
            else:
                row.next_attempt_at = retry_at
            s.flush()
            return _webhook_delivery(row)

    def list_webhook_deliveries(self, endpoint_id: str, tenant: str, *, after: str | None = None,
                                limit: int = 20) -> tuple[list[WebhookDelivery], bool]:
        """Newest first."""
        with self._read() as s:
            self._endpoint_row(s, endpoint_id, tenant)
            rows, has_more = _newest_first_page(s, WebhookDeliveryRow,
                                                WebhookDeliveryRow.endpoint_id == endpoint_id, after, limit,
                                                what="delivery of this webhook endpoint")
            return [_webhook_delivery(r) for r in rows], has_more
