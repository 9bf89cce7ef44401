"""Exporting a published adapter: the one implementation behind GET /v1/adapters/{name}/export
and `tuneserve adapters export --local`.

* `peft`: the registry's own files (adapter pair + manifest), no torch needed;
* `chatglm3`: PEFT for the original ChatGLM3-6B (fused query_key_value, original module
  names), only for adapters trained on a ChatGLM3 base: the key mapping would also accept a
  Llama adapter's q/k/v names and fuse them into a file no ChatGLM3 could load.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from service.core.domain import AdapterManifest
from service.core.errors import InvalidInput, ServiceUnavailable

EXPORT_FORMATS = ("chatglm3", "peft")


def check_export_format(fmt: str, manifest: AdapterManifest) -> None:
    """Refuse (InvalidInput naming `format`) what cannot be exported, before any work."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput(f"format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})", param="format")
    # None: a manifest written before the family was recorded; the tensor mapping still checks it.
    if fmt == "chatglm3" and manifest.model_family not in (None, "chatglm3"):
        raise InvalidInput(f"format 'chatglm3' is for adapters of a ChatGLM3 base; {manifest.name!r} was trained "
                           f"on a {manifest.model_family} base ({manifest.base_model}); use format 'peft'",
                           param="format", code="unsupported_format")


def export_adapter(adapter_dir: Path, manifest: AdapterManifest, fmt: str, out_dir: Path) -> Path:
    """Write the export of the (verified) adapter in `adapter_dir` to `out_dir` (new, or an
    empty dir for `peft`). Returns out_dir."""
    check_export_format(fmt, manifest)
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if fmt == "chatglm3":
        try:
            from service.models.export import export_adapter_chatglm3  # lazy: imports torch
        except ImportError as exc:
            raise ServiceUnavailable("chatglm3 export is not available on this server; use format=peft",
                                     param="format", code="export_unavailable") from exc
        # The base by the public id the manifest records (service.core.identity), not a fixed hub id.
        return export_adapter_chatglm3(adapter_dir, out_dir, base_model_name_or_path=manifest.base_model)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in adapter_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, out_dir / f.name)
    return out_dir
