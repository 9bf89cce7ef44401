"""/v1/files: upload (streamed + validated), list, get, delete, content."""
from __future__ import annotations

from pathlib import Path

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from service.api.deps import SettingsDep, StateDep, StoreDep, TenantDep
from service.api.paging import After, page_after
from service.api.schemas import FileDeleted, FileList, FilePublic, error_responses
from service.api.uploads import receive_upload
from service.core.errors import NotFound, TuneserveError
from service.core.results import RESULTS_PURPOSE

router = APIRouter(prefix="/v1/files", tags=["files"], responses=error_responses())

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary",
                                 "description": "JSONL: AdvertiseGen {content, summary}, ChatGLM3 "
                                                "{conversations}, or OpenAI {messages} rows"},
                        "purpose": {"type": "string", "enum": ["fine-tune"]},
                    },
                }
            }
        },
    }
}


@router.post("", response_model=FilePublic, openapi_extra=_UPLOAD_BODY, responses=error_responses(413),
             summary="Upload a JSONL dataset (validated row by row while streaming)")
async def create_file(request: Request, tenant: TenantDep, settings: SettingsDep, store: StoreDep,
                      state: StateDep) -> FilePublic:
    # The body is NOT declared as Form/File parameters: FastAPI would spool it whole first.
    try:
        info = await receive_upload(request, settings, store, tenant)
    except TuneserveError:
        state.metrics.uploads.labels("refused").inc()
        raise
    state.metrics.uploads.labels("accepted").inc()
    return FilePublic.from_domain(info)


@router.get("", response_model=FileList, responses=error_responses(404))
def list_files(tenant: TenantDep, store: StoreDep,
               purpose: str | None = Query(default=None, max_length=64),
               after: After = None,
               limit: int = Query(default=10_000, ge=1, le=10_000),
               order: str = Query(default="desc", pattern="^(asc|desc)$")) -> FileList:
    files = store.list_files(tenant, purpose=purpose)  # newest first
    if order == "asc":
        files.reverse()
    page, has_more = page_after(files, after, limit, what="file")
    return FileList(data=[FilePublic.from_domain(f) for f in page], has_more=has_more)


@router.get("/{file_id}", response_model=FilePublic, responses=error_responses(404))
def get_file(file_id: str, tenant: TenantDep, store: StoreDep) -> FilePublic:
    return FilePublic.from_domain(store.get_file(file_id, tenant))


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(404, 409))
def delete_file(file_id: str, tenant: TenantDep, store: StoreDep) -> FileDeleted:
    info = store.delete_file(file_id, tenant)
    Path(info.path).unlink(missing_ok=True)
    return FileDeleted(id=info.id)


@router.get("/{file_id}/content", response_class=FileResponse,
            responses={200: {"content": {"application/jsonl": {}, "text/csv": {}}}, **error_responses(404)})
async def file_content(file_id: str, tenant: TenantDep, store: StoreDep) -> FileResponse:
    info = await to_thread.run_sync(store.get_file, file_id, tenant)
    path = Path(info.path)
    if not path.is_file():
        raise NotFound(f"file {file_id!r} content is missing", param="file_id")
    media_type = "text/csv" if info.purpose == RESULTS_PURPOSE else "application/jsonl"
    return FileResponse(path, media_type=media_type, filename=info.filename)
