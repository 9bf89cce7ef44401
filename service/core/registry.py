"""Adapters on disk.

    <root>/<tenant>/<name>/<version>/{adapter_config.json, adapter_model.safetensors, manifest.json}

Publish writes into `<root>/<tenant>/<name>/.tmp-<uuid>/`, fsyncs, and renames the directory
to the next integer version, so a reader sees either no version or a complete one. The tmp
dir is flock()ed by its writer while it exists, so `clean_stale_tmp` removes only the
leftovers of dead writers (crashes), never a publish in progress in another process.

Every path is built by `_path`, which validates names (domain.check_name) and checks that the
resolved path stays inside the root (no `..`, absolute parts or symlinks out of it).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.core.domain import NAME_PATTERN, TENANT_PATTERN, AdapterManifest, check_name
from service.core.errors import IntegrityError, InvalidInput, NotFound

try:  # POSIX; elsewhere stale tmp dirs are judged by age
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)

TMP_PREFIX = ".tmp-"
_TMP_RE = re.compile(r"^\.tmp-[0-9a-f]{32}$")
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")  # ASCII only (str.isdigit accepts other scripts)
_CHUNK = 1 << 20
_FALLBACK_STALE_S = 3600.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_and_hash(src: Path, dst: Path) -> str:
    """Stream-copy src to dst, fsync dst, return the sha256 of the bytes written."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(_CHUNK):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _lock_dir(path: Path) -> int | None:
    """Open `path` and take an exclusive non-blocking flock. Returns the fd, or None when
    another live open file description holds it. Raises OSError if the dir vanished."""
    fd = os.open(path, os.O_RDONLY)
    if fcntl is None:  # pragma: no cover
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class AdapterRegistry:
    def __init__(self, root: Path | str):
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()

    # -- the one place paths are made ------------------------------------------------------
    def _path(self, tenant: str, name: str | None = None, version: int | None = None, *,
              tmp: str | None = None) -> Path:
        check_name(tenant, param="tenant", pattern=TENANT_PATTERN)
        parts = [tenant]
        if name is not None:
            check_name(name, param="model", pattern=NAME_PATTERN)
            parts.append(name)
        if version is not None:
            if name is None or isinstance(version, bool) or not isinstance(version, int) or not 1 <= version < 10**9:
                raise InvalidInput(f"version must be a positive integer (got {version!r})", param="version")
            parts.append(str(version))
        if tmp is not None:
            if name is None or version is not None or not _TMP_RE.fullmatch(tmp):
                raise InvalidInput(f"invalid temporary directory name {tmp!r}", param="model")
            parts.append(tmp)
        path = self.root.joinpath(*parts)
        if not path.resolve().is_relative_to(self._root_resolved):
            raise InvalidInput(f"path for {'/'.join(parts)!r} leaves the registry root", param="model")
        return path

    # -- publish ---------------------------------------------------------------------------
    def publish(self, *, tenant: str, name: str, source_dir: Path, manifest: dict) -> AdapterManifest:
        """Copy the adapter pair from `source_dir` as the next version of tenant/name.
        `manifest` gives base_model, target_modules, r, lora_alpha, job_id, training, metrics...;
        tenant/name/version/files (and created_at unless given) are filled in here."""
        name_dir = self._path(tenant, name)
        source_dir = Path(source_dir)
        for fname in ADAPTER_FILES:
            if not (source_dir / fname).is_file():
                raise InvalidInput(f"{fname} missing in {source_dir}", param="source_dir")
        try:  # fail before copying anything when the caller's manifest is incomplete
            AdapterManifest.model_validate({**manifest, "tenant": tenant, "name": name, "version": 1,
                                            "created_at": manifest.get("created_at") or datetime.now(timezone.utc),
                                            "files": {}})
        except ValidationError as exc:
            raise InvalidInput(f"invalid adapter manifest: {exc}", param="manifest") from exc
        name_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._path(tenant, name, tmp=f"{TMP_PREFIX}{uuid.uuid4().hex}")
        tmp.mkdir()
        lock_fd: int | None = None
        try:
            lock_fd = _lock_dir(tmp)
            files = {fname: _copy_and_hash(source_dir / fname, tmp / fname) for fname in ADAPTER_FILES}
            created_at = manifest.get("created_at") or datetime.now(timezone.utc)
            for _ in range(1000):
                version = (self.latest_version(tenant, name) or 0) + 1
                final = self._path(tenant, name, version)
                try:
                    record = AdapterManifest.model_validate(
                        {**manifest, "tenant": tenant, "name": name, "version": version,
                         "created_at": created_at, "files": files})
                except ValidationError as exc:
                    raise InvalidInput(f"invalid adapter manifest: {exc}", param="manifest") from exc
                _write_json(tmp / MANIFEST, record.model_dump(mode="json"))
                _fsync_dir(tmp)
                if final.exists():  # an empty dir would be silently replaced by rename
                    continue
                try:
                    os.rename(tmp, final)
                except OSError as exc:
                    if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                        continue  # another publisher took this version number: take the next
                    raise
                _fsync_dir(name_dir)
                log.info("published adapter %s/%s v%d", tenant, name, version)
                return record
            raise IntegrityError(f"could not allocate a version for {tenant}/{name}")  # pragma: no cover
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if lock_fd is not None:
                os.close(lock_fd)

    # -- read ------------------------------------------------------------------------------
    def _versions(self, tenant: str, name: str) -> list[int]:
        try:
            entries = os.listdir(self._path(tenant, name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(int(e) for e in entries if _VERSION_RE.fullmatch(e))

    def latest_version(self, tenant: str, name: str) -> int | None:
        """One listdir: cheap enough for the engine to poll for a republish."""
        versions = self._versions(tenant, name)
        return versions[-1] if versions else None

    def _read_manifest(self, path: Path, tenant: str, name: str, version: int) -> AdapterManifest:
        try:
            manifest = AdapterManifest.model_validate_json((path / MANIFEST).read_bytes())
        except FileNotFoundError as exc:
            raise IntegrityError(f"adapter {tenant}/{name} v{version} has no manifest") from exc
        except ValidationError as exc:
            raise IntegrityError(f"adapter {tenant}/{name} v{version}: bad manifest: {exc}") from exc
        if (manifest.tenant, manifest.name, manifest.version) != (tenant, name, version):
            raise IntegrityError(f"manifest at {tenant}/{name}/{version} describes "
                                 f"{manifest.tenant}/{manifest.name}/{manifest.version}")
        return manifest

    def resolve(self, tenant: str, name: str, version: int | None = None) -> tuple[Path, AdapterManifest]:
        """(directory, manifest) of a version, the latest when None. NotFound if absent."""
        if version is None:
            version = self.latest_version(tenant, name)
            if version is None:
                raise NotFound(f"adapter {name!r} not found", param="model")
        path = self._path(tenant, name, version)
        if not path.is_dir():
            raise NotFound(f"adapter {name!r} version {version} not found", param="model")
        return path, self._read_manifest(path, tenant, name, version)

    def verify(self, path: Path, manifest: AdapterManifest) -> None:
        """sha256 of each adapter file against the manifest; IntegrityError on any difference."""
        path = Path(path)
        missing = [f for f in ADAPTER_FILES if f not in manifest.files]
        if missing:
            raise IntegrityError(f"manifest of {manifest.tenant}/{manifest.name} v{manifest.version} "
                                 f"lists no hash for {missing}")
        for fname, expected in manifest.files.items():
            if fname not in ADAPTER_FILES:
                raise IntegrityError(f"manifest lists unexpected file {fname!r}")
            try:
                actual = sha256_file(path / fname)
            except FileNotFoundError as exc:
                raise IntegrityError(f"{fname} missing in {manifest.name} v{manifest.version}") from exc
            if actual != expected:
                raise IntegrityError(f"{fname} of {manifest.tenant}/{manifest.name} v{manifest.version} "
                                     f"does not match its manifest sha256")

    def _names(self, tenant: str) -> list[str]:
        try:
            entries = os.listdir(self._path(tenant))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e for e in entries if NAME_PATTERN.fullmatch(e) and ".." not in e)

    def list(self, tenant: str) -> list[AdapterManifest]:
        """Latest version of each adapter of the tenant, by name. Unreadable ones are skipped."""
        out = []
        for name in self._names(tenant):
            try:
                out.append(self.resolve(tenant, name)[1])
            except (NotFound, IntegrityError) as exc:
                log.warning("skipping adapter %s/%s: %s", tenant, name, exc)
        return out

    def list_versions(self, tenant: str, name: str) -> list[AdapterManifest]:
        """Every version, oldest first ([] when the adapter does not exist)."""
        out = []
        for version in self._versions(tenant, name):
            try:
                out.append(self.resolve(tenant, name, version)[1])
            except (NotFound, IntegrityError) as exc:
                log.warning("skipping adapter %s/%s v%d: %s", tenant, name, version, exc)
        return out

    # -- delete / cleanup ------------------------------------------------------------------
    def delete(self, tenant: str, name: str, version: int | None = None) -> None:
        """Delete one version, or every version when None. The directory is first renamed to a
        tmp name (atomic: readers never see a half-deleted version), then removed."""
        if version is None:
            target = self._path(tenant, name)
            if not target.is_dir():
                raise NotFound(f"adapter {name!r} not found", param="model")
            graveyard = self._path(tenant).joinpath(f"{TMP_PREFIX}{uuid.uuid4().hex}")
        else:
            target = self._path(tenant, name, version)
            if not target.is_dir():
                raise NotFound(f"adapter {name!r} version {version} not found", param="model")
            graveyard = self._path(tenant, name, tmp=f"{TMP_PREFIX}{uuid.uuid4().hex}")
        os.rename(target, graveyard)
        _fsync_dir(graveyard.parent)
        shutil.rmtree(graveyard, ignore_errors=True)

    def clean_stale_tmp(self) -> int:
        """Remove `.tmp-*` dirs left by crashed publishes/deletes. A dir whose writer is alive
        (flock held) is kept. Returns how many were removed."""
        removed = 0
        candidates = [*self.root.glob(f"*/{TMP_PREFIX}*"), *self.root.glob(f"*/*/{TMP_PREFIX}*")]
        for path in candidates:
            if not _TMP_RE.fullmatch(path.name) or not path.is_dir() or path.is_symlink():
                continue
            if fcntl is None:  # pragma: no cover
                if time.time() - path.stat().st_mtime < _FALLBACK_STALE_S:
                    continue
                fd = None
            else:
                try:
                    fd = _lock_dir(path)
                except FileNotFoundError:
                    continue
                if fd is None:
                    continue  # a live publish holds it
            try:
                shutil.rmtree(path, ignore_errors=True)
                removed += not path.exists()
            finally:
                if fd is not None:
                    os.close(fd)
        return removed
