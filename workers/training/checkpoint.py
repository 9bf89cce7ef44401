"""Checkpoints: `work_dir/checkpoints/step-N/` holding the LoRA weights (PEFT format), the
optimizer and scheduler states, every RNG state and the data position — everything a
redelivered job needs to continue as if it had never stopped.

A checkpoint is written into a `checkpoints/.step-N.tmp-*/` dir, fsynced, then renamed; only
directories named `step-N` that contain `state.json` (written last) count as complete, so a
worker killed mid-write leaves nothing a resume could trust. The layout (and listing it)
lives in service/core/checkpoints.py, which the API reads without torch.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.atomic import atomic_dir
from service.core.checkpoints import CHECKPOINTS, STATE, complete_checkpoints, complete_in, read_state

__all__ = ["CHECKPOINTS", "STATE", "complete_checkpoints", "read_state", "save_checkpoint", "load_checkpoint",
           "remove_checkpoints", "remove_partial_checkpoints", "rng_state", "set_rng_state", "get_lora_keys"]

KEEP_LAST = 3


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(work_dir: Path, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    keep_last: int = KEEP_LAST) -> Path:
    """Write step-N atomically; prune older complete checkpoints beyond `keep_last`."""
    root = Path(work_dir) / CHECKPOINTS
    # replace: a re-run of the same step (e.g. after a resume) supersedes it.
    with atomic_dir(root / f"step-{step}", replace=True) as tmp:
        model.save_pretrained(str(tmp))  # adapter_config.json + adapter_model.safetensors
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        full = dict(state, step=step, created_at=time.time())
        (tmp / STATE).write_text(json.dumps(full, indent=1))
    final = root / f"step-{step}"
    for old in complete_in(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, device: str) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `ckpt`; return its state.json.
    Every file is read before anything is applied, so an unreadable checkpoint raises
    without leaving the model half-restored (the caller then tries an older one)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = read_state(ckpt)
    weights = load_file(str(ckpt / "adapter_model.safetensors"), device="cpu")
    opt_state = torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False)
    sched_state = torch.load(ckpt / "scheduler.pt", weights_only=False)
    rng = torch.load(ckpt / "rng.pt", weights_only=False)
    expected = set(get_lora_keys(model))
    if expected and set(weights) != expected:
        raise ValueError(f"checkpoint {ckpt} does not match the model's adapter "
                         f"({len(weights)} tensors vs {len(expected)})")
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(opt_state)
    scheduler.load_state_dict(sched_state)
    set_rng_state(rng)
    return state


def get_lora_keys(model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model).keys())


def remove_partial_checkpoints(work_dir: Path) -> list[Path]:
    """Remove the `.step-N.tmp-*` dirs an attempt killed mid-write left (call only from the
    job's current attempt: it owns the work dir). Returns what was removed."""
    root = Path(work_dir) / CHECKPOINTS
    partial = sorted(root.glob(".step-*.tmp-*")) if root.is_dir() else []
    for d in partial:
        shutil.rmtree(d, ignore_errors=True)
    return partial


def remove_checkpoints(work_dir: Path) -> None:
    shutil.rmtree(Path(work_dir) / CHECKPOINTS, ignore_errors=True)
