"""The on-disk layout of a job's checkpoints, readable without torch.

`work_dir/checkpoints/step-N/` is complete once its `state.json` exists (the trainer writes
it last, then renames the directory into place). The API lists checkpoints through this
module, so its job routes never import the training code (which imports torch); the
trainer writes and restores them in workers/training/checkpoint.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
