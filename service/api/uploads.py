"""Streaming multipart upload for POST /v1/files.

The request body is read chunk by chunk (`request.stream()`) and parsed incrementally with
python-multipart; the `file` part goes straight into a temp file under files_dir while the
DatasetValidator checks every row, so the size/row/line limits bite while the bytes are
still arriving and nothing is ever spooled whole. Any failure removes the temp file; only a
fully valid upload is renamed into place and gets a store row."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.core.config import Settings
from service.core.datasets import DatasetValidator
from service.core.domain import DatasetFormat, FileInfo
from service.core.errors import InvalidInput, PayloadTooLarge
from service.core.store import Store

log = logging.getLogger("tuneserve.api.uploads")

ALLOWED_PURPOSES = ("fine-tune",)
MAX_FIELD_BYTES = 1024          # small form fields (purpose, ...)
MAX_PARTS = 16
MAX_FILENAME_CHARS = 255
# Multipart framing around the file (boundaries, part headers, small fields).
FRAMING_SLACK = 64 * 1024
# Half-uploads: named so, they are never mistaken for a published file.
PART_PREFIX, PART_SUFFIX = ".upload-", ".part"
# A .part younger than this is left alone at startup even when unlocked (just created: its
# upload has not taken the lock yet).
PART_MIN_AGE_S = 60.0


def check_filename(raw: str) -> str:
    """A display name only (never used as a path), but hostile names are refused outright."""
    name = raw
    if not name or len(name) > MAX_FILENAME_CHARS:
        raise InvalidInput(f"file name must be 1..{MAX_FILENAME_CHARS} characters", param="file")
    if name in (".", "..") or "/" in name or "\\" in name or ".." in name:
        raise InvalidInput("file name must not contain '/', '\\\\' or '..'", param="file")
    for ch in name:
        # Cc: controls incl. NUL; Cf: bidi overrides, zero-width chars; Cs/Co: surrogates, private use.
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise InvalidInput(f"file name contains a forbidden character U+{ord(ch):04X}", param="file")
    if unicodedata.normalize("NFKC", name) != name:
        raise InvalidInput("file name must be in Unicode NFKC form (no look-alike characters)", param="file")
    return name


@dataclass
class _Part:
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None


@dataclass
class _Collector:
    """python-multipart callbacks; they only record, the async loop does the work."""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    field_name: bytearray = field(default_factory=bytearray)
    field_value: bytearray = field(default_factory=bytearray)
    events: list[tuple[str, Any]] = field(default_factory=list)
    ended: bool = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": lambda d, s, e: self.field_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self.field_value.extend(d[s:e]),
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": lambda d, s, e: self.events.append(("data", bytes(d[s:e]))),
            "on_part_end": lambda: self.events.append(("end", None)),
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_end(self) -> None:
        self.headers[bytes(self.field_name).lower()] = bytes(self.field_value)
        self.field_name.clear()
        self.field_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        part = _Part()
        if disposition == b"form-data":
            name = options.get(b"name")
            part.name = name.decode("utf-8", "replace") if name is not None else None
            fname = options.get(b"filename")
            if fname is not None:
                try:
                    part.filename = fname.decode("utf-8")
                except UnicodeDecodeError:
                    part.filename = "\x00"  # refused by check_filename with a clear message
        ctype = self.headers.get(b"content-type")
        part.content_type = ctype.decode("latin-1") if ctype else None
        self.events.append(("begin", part))

    def on_end(self) -> None:
        self.ended = True


class _FileSink:
    """Temp file + sha256 + validator. Runs in a worker thread (JSON parsing is CPU)."""

    def __init__(self, settings: Settings, files_dir: Path):
        self.files_dir = files_dir
        self.tmp = files_dir / f"{PART_PREFIX}{uuid.uuid4().hex}{PART_SUFFIX}"
        self.fh = open(self.tmp, "xb")
        # Held while the upload lives (the kernel drops it when the process dies, even by
        # SIGKILL): what tells clean_stale_parts a live upload from a dead one.
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.max_bytes = settings.max_upload_bytes
        self.validator = DatasetValidator(max_bytes=settings.max_upload_bytes,
                                          max_rows=settings.max_upload_rows,
                                          max_line_bytes=settings.max_line_bytes,
                                          max_depth=settings.max_json_depth)

    def write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.nbytes += len(chunk)
            if self.nbytes > self.max_bytes:
                raise PayloadTooLarge(f"file is larger than the limit of {self.max_bytes} bytes",
                                      param="file")
            self.validator.feed(chunk)
            self.fh.write(chunk)
            self.sha.update(chunk)

    def finish(self) -> tuple[DatasetFormat, int]:
        fmt, rows = self.validator.finish()
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return fmt, rows

    def publish(self) -> Path:
        final = self.files_dir / f"{uuid.uuid4().hex}.jsonl"
        os.replace(self.tmp, final)
        return final

    def discard(self) -> None:
        try:
            self.fh.close()
        except Exception:  # pragma: no cover
            pass
        try:
            self.tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover
            log.warning("could not remove %s", self.tmp)


def clean_stale_parts(files_dir: Path, *, min_age_s: float = PART_MIN_AGE_S) -> list[Path]:
    """Remove half-uploads left by a killed API (run at startup): `.upload-*.part` files older
    than min_age_s whose lock no live upload (of any process sharing files_dir) holds."""
    removed: list[Path] = []
    now = time.time()
    for part in files_dir.glob(f"{PART_PREFIX}*{PART_SUFFIX}"):
        try:
            if now - part.lstat().st_mtime < min_age_s or not part.is_file() or part.is_symlink():
                continue
            with open(part, "rb") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live upload, only slow
                part.unlink()
            removed.append(part)
        except FileNotFoundError:
            continue  # finished or discarded meanwhile
        except OSError:
            log.warning("could not remove the stale upload %s", part, exc_info=True)
    if removed:
        log.warning("removed %d half-upload(s) left by an interrupted API: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


_BOUNDARY_RE = re.compile(rb"^[ -~]{1,200}$")


async def receive_upload(request: Request, settings: Settings, store: Store, tenant: str) -> FileInfo:
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise InvalidInput("send the dataset as multipart/form-data with fields `file` and `purpose`",
                           param="file", code="unsupported_media_type")
    boundary = params.get(b"boundary")
    if not boundary or not _BOUNDARY_RE.match(boundary):
        raise InvalidInput("multipart boundary missing or invalid", param="file")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise InvalidInput("invalid Content-Length", param="file") from None
        if declared_n > settings.max_upload_bytes + FRAMING_SLACK:
            # Refuse before reading a byte.
            raise PayloadTooLarge(f"upload is larger than the limit of {settings.max_upload_bytes} bytes",
                                  param="file")

    files_dir = settings.files_dir
    files_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector()
    parser = MultipartParser(boundary, collector.callbacks(),
                             max_size=settings.max_upload_bytes + FRAMING_SLACK)
    sink: _FileSink | None = None
    fields: dict[str, str] = {}
    current: _Part | None = None
    filename = ""
    small = bytearray()
    n_parts = 0
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > settings.max_upload_bytes + FRAMING_SLACK:
                raise PayloadTooLarge(f"upload is larger than the limit of {settings.max_upload_bytes} bytes",
                                      param="file")
            try:
                parser.write(chunk)
            except MultipartParseError as exc:
                raise InvalidInput(f"malformed multipart body: {exc}", param="file") from None
            file_chunks: list[bytes] = []
            for kind, value in collector.events:
                if kind == "begin":
                    n_parts += 1
                    if n_parts > MAX_PARTS:
                        raise InvalidInput("too many form fields", param="file")
                    current = value
                    small.clear()
                    if current.name == "file":
                        if sink is not None:
                            raise InvalidInput("send exactly one `file` field", param="file")
                        if current.filename is None:
                            raise InvalidInput("`file` must be a file part (with a filename)", param="file")
                        filename = check_filename(current.filename)
                        sink = await anyio.to_thread.run_sync(_FileSink, settings, files_dir)
                elif kind == "data":
                    if current is not None and current.name == "file":
                        file_chunks.append(value)
                    else:
                        small.extend(value)
                        if len(small) > MAX_FIELD_BYTES:
                            raise InvalidInput(f"form field {current.name if current else '?'!r} is too long",
                                               param=current.name if current else None)
                elif kind == "end":
                    if current is not None and current.name not in (None, "file"):
                        try:
                            fields[current.name] = bytes(small).decode("utf-8")
                        except UnicodeDecodeError:
                            raise InvalidInput(f"form field {current.name!r} is not UTF-8",
                                               param=current.name) from None
                    if file_chunks and sink is not None:
                        await anyio.to_thread.run_sync(sink.write, file_chunks)
                        file_chunks = []
                    current = None
            collector.events.clear()
            if file_chunks and sink is not None:
                await anyio.to_thread.run_sync(sink.write, file_chunks)
        if not collector.ended:
            raise InvalidInput("multipart body ended early (missing closing boundary)", param="file")
        purpose = fields.get("purpose")
        if purpose is None:
            raise InvalidInput("field `purpose` is required (\"fine-tune\")", param="purpose",
                               code="missing_required_parameter")
        if purpose not in ALLOWED_PURPOSES:
            raise InvalidInput(f"purpose must be one of {list(ALLOWED_PURPOSES)} (got {purpose!r})",
                               param="purpose")
        if sink is None:
            raise InvalidInput("field `file` is required", param="file", code="missing_required_parameter")
        fmt, rows = await anyio.to_thread.run_sync(sink.finish)
        final = await anyio.to_thread.run_sync(sink.publish)
        try:
            return await anyio.to_thread.run_sync(lambda: store.create_file(
                tenant=tenant, filename=filename, purpose=purpose, bytes=sink.nbytes,
                rows=rows, format=fmt, sha256=sink.sha.hexdigest(), path=str(final)))
        except BaseException:
            final.unlink(missing_ok=True)
            raise
    except ClientDisconnect:
        raise InvalidInput("client disconnected during upload", param="file") from None
    finally:
        if sink is not None:
            await anyio.to_thread.run_sync(sink.discard)
