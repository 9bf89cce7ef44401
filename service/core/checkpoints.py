"""The on-disk layout of a job's checkpoints, readable without torch.

`work_dir/checkpoints/step-N/` is complete once its `state.json` exists (the trainer writes
it last, then renames the directory into place). The API lists checkpoints through this
module, so its job routes never import the training code (which imports torch); the
trainer writes and restores them in workers/training/checkpoint.py.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service.core.domain import AdapterManifest, Job
from service.core.errors import NotFound

CHECKPOINTS = "checkpoints"
STATE = "state.json"


def step_of(d: Path) -> int | None:
    name = d.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def complete_in(root: Path) -> list[Path]:
    """Complete `step-N` dirs directly under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and step_of(d) is not None and (d / STATE).is_file()]
    return sorted(dirs, key=step_of)


def complete_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoint dirs of a job, oldest first."""
    return complete_in(Path(work_dir) / CHECKPOINTS)


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / STATE).read_text())


def list_checkpoints(work_dir: Path) -> list[dict[str, Any]]:
    """Complete checkpoints, oldest first: step, path, created_at (unix s), loss (of that step)."""
    out = []
    for d in complete_checkpoints(work_dir):
        try:
            st = read_state(d)
        except (OSError, ValueError):
            continue
        out.append({"step": int(st.get("step", step_of(d) or 0)), "path": str(d),
                    "created_at": st.get("created_at"), "loss": st.get("loss"),
                    "eval_loss": st.get("eval_loss"), "epoch": st.get("epoch_float"),
                    "total_steps": st.get("total_steps")})
    return out


# ---------------------------------------------------------------------------------------
# Checkpoints as models: a checkpoint's `fine_tuned_model_checkpoint` is `<job id>:step-N`,
# and chat accepts it like an adapter name (its directory holds the PEFT pair).
# ---------------------------------------------------------------------------------------
_CHECKPOINT_MODEL = re.compile(r"^(ftjob-[a-z0-9]{1,64}):step-([0-9]{1,9})$")


def checkpoint_model_id(job_id: str, step: int) -> str:
    return f"{job_id}:step-{step}"


def parse_checkpoint_model(model: str) -> tuple[str, int] | None:
    """(job id, step) of a checkpoint model id, else None."""
    m = _CHECKPOINT_MODEL.fullmatch(model or "")
    return (m.group(1), int(m.group(2))) if m else None


class CheckpointModels:
    """The adapter registry as the engine and the API read it, plus job checkpoints as
    read-only, single-version adapters named by their checkpoint model id. Everything else is
    the registry's (delegated). A checkpoint resolves only for the tenant owning its job and
    while it is on disk (training keeps the newest few)."""

    def __init__(self, registry, jobs_dir: Path, get_job: Callable[[str], Job]):
        self._registry, self._jobs_dir, self._get_job = registry, Path(jobs_dir), get_job

    def __getattr__(self, name: str):
        return getattr(self._registry, name)

    def resolve(self, tenant: str, name: str, version: int | None = None) -> tuple[Path, AdapterManifest]:
        parsed = parse_checkpoint_model(name)
        if parsed is None:
            return self._registry.resolve(tenant, name, version)
        return self._resolve_checkpoint(tenant, name, *parsed, version)

    def latest_version(self, tenant: str, name: str) -> int | None:
        """Per chat request: a checkpoint is looked up, not hashed (resolve hashes when loading)."""
        parsed = parse_checkpoint_model(name)
        if parsed is None:
            return self._registry.latest_version(tenant, name)
        try:
            self._locate(tenant, name, *parsed, None)
        except NotFound:
            return None
        return 1

    def _locate(self, tenant: str, name: str, job_id: str, step: int, version: int | None) -> tuple[Job, Path]:
        missing = NotFound(f"checkpoint {name!r} not found", param="model")
        try:
            job = self._get_job(job_id)
        except NotFound:
            raise missing from None
        path = self._jobs_dir / job_id / CHECKPOINTS / f"step-{step}"
        if job.tenant != tenant or version not in (None, 1) or not (path / STATE).is_file():
            raise missing
        return job, path

    def _resolve_checkpoint(self, tenant: str, name: str, job_id: str, step: int,
                            version: int | None) -> tuple[Path, AdapterManifest]:
        from service.core.registry import ADAPTER_CONFIG, ADAPTER_FILES, sha256_file

        job, path = self._locate(tenant, name, job_id, step, version)
        missing = NotFound(f"checkpoint {name!r} not found", param="model")
        try:
            state = read_state(path)
            config = json.loads((path / ADAPTER_CONFIG).read_text())
            files = {f: sha256_file(path / f) for f in ADAPTER_FILES}
        except (OSError, ValueError):  # pruned or half-removed meanwhile
            raise missing from None
        created = state.get("created_at")
        manifest = AdapterManifest(
            tenant=tenant, name=name, version=1, base_model=job.model,
            base_model_fingerprint=(state.get("resume_key") or {}).get("base"),
            target_modules=sorted(config.get("target_modules") or []), r=int(config.get("r", 0)),
            lora_alpha=float(config.get("lora_alpha", 0)), job_id=job_id,
            created_at=datetime.fromtimestamp(created, timezone.utc) if created else datetime.now(timezone.utc),
            files=files, training={"checkpoint": {"job_id": job_id, "step": step}},
            metrics={"step": step, "train_loss": state.get("loss"), "valid_loss": state.get("eval_loss")})
        return path, manifest
