"""/v1/adapters: the tenant's registry (manifests with metrics), delete, export."""
from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Literal

from anyio import to_thread
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from service.api.deps import RegistryDep, SettingsDep, StateDep, TenantDep
from service.api.schemas import AdapterDeleted, AdapterList, AdapterPublic, SampleList, error_responses
from service.core import export as adapter_export
from service.core.domain import AdapterManifest
from service.core.identity import public_id
from service.core.errors import InvalidInput, NotFound

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=error_responses())


def _not_found(name: str, version: int | None = None) -> NotFound:
    what = f"adapter {name!r}" + (f" version {version}" if version is not None else "")
    return NotFound(f"{what} not found", param="name", code="adapter_not_found")


def _resolve(registry, tenant: str, name: str, version: int | None):
    try:
        return registry.resolve(tenant, name, version)
    except (NotFound, InvalidInput):
        raise _not_found(name, version) from None


def _public(m: AdapterManifest, settings) -> AdapterPublic:
    return AdapterPublic.from_domain(m, base_model=public_id(m.base_model, settings))


@router.get("", response_model=AdapterList)
def list_adapters(tenant: TenantDep, registry: RegistryDep, settings: SettingsDep) -> AdapterList:
    return AdapterList(data=[_public(m, settings) for m in registry.list(tenant)])


@router.get("/{name}", response_model=AdapterPublic, responses=error_responses(404))
def get_adapter(name: str, tenant: TenantDep, registry: RegistryDep, settings: SettingsDep,
                version: int | None = Query(default=None, ge=1, le=999_999_999)) -> AdapterPublic:
    return _public(_resolve(registry, tenant, name, version)[1], settings)


@router.get("/{name}/samples", response_model=SampleList, responses=error_responses(404))
def list_adapter_samples(name: str, tenant: TenantDep, registry: RegistryDep,
                         version: int | None = Query(default=None, ge=1, le=999_999_999),
                         limit: int = Query(default=100, ge=1, le=100_000)) -> SampleList:
    """The before/after rows of the evaluation that produced this adapter version."""
    return SampleList.from_metrics(_resolve(registry, tenant, name, version)[1].metrics, limit)


@router.get("/{name}/versions", response_model=AdapterList, responses=error_responses(404))
def list_adapter_versions(name: str, tenant: TenantDep, registry: RegistryDep, settings: SettingsDep) -> AdapterList:
    _resolve(registry, tenant, name, None)  # 404 (not 400) for names that cannot exist
    return AdapterList(data=[_public(m, settings) for m in registry.list_versions(tenant, name)])


@router.delete("/{name}", response_model=AdapterDeleted, responses=error_responses(404, 409))
def delete_adapter(name: str, tenant: TenantDep, registry: RegistryDep, state: StateDep,
                   version: int | None = Query(default=None, ge=1, le=999_999_999)) -> AdapterDeleted:
    try:
        versions = [m.version for m in registry.list_versions(tenant, name)] if version is None else [version]
        state.delete_adapter(tenant, name, version)
    except (NotFound, InvalidInput):
        raise _not_found(name, version) from None
    return AdapterDeleted(id=name, versions=versions)


def _build_export(adapter_dir: Path, manifest: AdapterManifest, fmt: str, archive: str, stem: str) -> Path:
    work = Path(tempfile.mkdtemp(prefix="tuneserve-export-"))
    try:
        content = adapter_export.export_adapter(adapter_dir, manifest, fmt, work / stem)
        if archive == "zip":
            out = work / f"{stem}.zip"
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(content.rglob("*")):
                    if f.is_file():
                        zf.write(f, f"{stem}/{f.relative_to(content)}")
        else:
            out = work / f"{stem}.tar.gz"
            with tarfile.open(out, "w:gz") as tf:
                tf.add(content, arcname=stem)
        shutil.rmtree(content, ignore_errors=True)
        return out
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@router.get("/{name}/export", response_class=FileResponse,
            responses={200: {"content": {"application/zip": {}, "application/gzip": {}}}, **error_responses(404)})
async def export_adapter(name: str, tenant: TenantDep, registry: RegistryDep,
                         format: Literal["chatglm3", "peft"] = Query(default="chatglm3"),
                         archive: Literal["zip", "tar"] = Query(default="zip"),
                         version: int | None = Query(default=None, ge=1, le=999_999_999)) -> FileResponse:
    path, manifest = await to_thread.run_sync(_resolve, registry, tenant, name, version)
    adapter_export.check_export_format(format, manifest)  # before hashing the files
    await to_thread.run_sync(registry.verify, path, manifest)
    stem = f"{manifest.name}-v{manifest.version}-{format}"
    out = await to_thread.run_sync(_build_export, path, manifest, format, archive, stem)
    return FileResponse(out, filename=out.name,
                        media_type="application/zip" if archive == "zip" else "application/gzip",
                        background=BackgroundTask(shutil.rmtree, out.parent, ignore_errors=True))
