"""Data-parallel training over several GPUs of one host (spec.n_gpus > 1) through torchrun.

The calling process (the Celery task) stays the only one that talks to the store: it writes
the run to `work_dir/launch/`, starts `torchrun --standalone --nproc_per_node=N -m
workers.training.distributed run.json`, forwards the events rank 0 appends to
`events.jsonl` to its Progress, turns `should_stop()` into a `CANCEL` file that every
step's stop check reads (all ranks agree through an all-reduce), and reads rank 0's
`outcome.json` (or `error.json`). Each rank runs the ordinary run_training with WORLD_SIZE
set: it takes its share of every step's rows and gradients are summed over ranks (loop.py),
so the effective batch and the loss are those of one process. The children die with their
parent (PR_SET_PDEATHSIG), so a killed worker leaves no orphan training on the GPUs.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.core.domain import JobProgress, TrainingSpec
from service.core.errors import Cancelled, TrainingError

LAUNCH = "launch"


def _set_pdeathsig() -> None:
    """Linux: die with SIGKILL when the parent dies (no orphaned GPU training)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def launch_command(run_file: Path, n_procs: int, *, python: str = sys.executable) -> list[str]:
    """The torchrun command line for one run (standalone rendezvous on a free local port)."""
    if n_procs < 1:
        raise ValueError("n_procs must be >= 1")
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
            "-m", "workers.training.distributed", str(run_file)]


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(list(row), ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_launch_files(run, launch_dir: Path) -> Path:
    from workers.training.data import conversations_list

    launch_dir.mkdir(parents=True, exist_ok=True)
    for name in ("events.jsonl", "outcome.json", "error.json", "CANCEL"):
        (launch_dir / name).unlink(missing_ok=True)
    train = launch_dir / "train.jsonl"
    _write_jsonl(train, conversations_list(run.train_conversations) or [])
    val = None
    if run.validation_conversations is not None:
        val = launch_dir / "validation.jsonl"
        _write_jsonl(val, conversations_list(run.validation_conversations) or [])
    cfg = {"job_id": run.job_id, "tenant": run.tenant, "base_model_ref": run.base_model_ref,
           "spec": run.spec.model_dump(mode="json"), "train": str(train), "validation": str(val) if val else None,
           "work_dir": str(run.work_dir), "device": run.device, "models_cache_dir": str(run.models_cache_dir),
           "memory_budget_bytes": run.memory_budget_bytes, "keep_checkpoints": run.keep_checkpoints,
           "base_model_id": run.base_model_id}
    path = launch_dir / "run.json"
    path.write_text(json.dumps(cfg))
    return path


def run_training_distributed(run, progress, *, poll_s: float = 0.5):
    """Launch torchrun for spec.n_gpus processes and relay its events; returns rank 0's outcome."""
    import torch

    from workers.training.recipe import TrainingOutcome

    n = run.spec.n_gpus
    cpu = run.device == "cpu"
    if not cpu and torch.cuda.device_count() < n:
        raise TrainingError(f"the job asks for {n} GPUs but this worker has {torch.cuda.device_count()}",
                            code="invalid_plan", param="hyperparameters.n_gpus")
    launch_dir = Path(run.work_dir) / LAUNCH
    run_file = write_launch_files(run, launch_dir)
    events = launch_dir / "events.jsonl"
    events.touch()
    cmd = launch_command(run_file, n)
    progress.event(f"launching data-parallel training on {n} {'processes' if cpu else 'GPUs'}",
                   data={"command": cmd})
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    stderr_path = launch_dir / "stderr.log"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=str(Path(__file__).resolve().parents[2]), env=env,
                                stdout=err, stderr=subprocess.STDOUT, preexec_fn=_set_pdeathsig)
        offset = 0
        try:
            while True:
                done = proc.poll() is not None
                offset = _relay(events, offset, progress)
                if done:
                    break
                if progress.should_stop():
                    (launch_dir / "CANCEL").touch()
                time.sleep(poll_s)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    error = launch_dir / "error.json"
    if error.is_file():
        e = json.loads(error.read_text())
        if e.get("type") == "Cancelled":
            raise Cancelled(e["message"])
        raise TrainingError(e["message"], code=e.get("code") or "internal", param=e.get("param"))
    outcome = launch_dir / "outcome.json"
    if proc.returncode != 0 or not outcome.is_file():
        tail = stderr_path.read_text(errors="replace")[-3000:]
        if "out of memory" in tail.lower():
            raise TrainingError(f"out of memory in a data-parallel rank: {tail[-500:]}", code="out_of_memory")
        raise TrainingError(f"data-parallel training exited with {proc.returncode}: {tail}", code="internal")
    return TrainingOutcome.from_json(outcome.read_text(encoding="utf-8"))


def _relay(events: Path, offset: int, progress) -> int:
    with open(events, encoding="utf-8") as f:
        f.seek(offset)
        while True:
            line = f.readline()
            if not line or not line.endswith("\n"):
                return offset  # a partial line is read again next time
            offset += len(line.encode("utf-8"))
            row = json.loads(line)
            if row["kind"] == "progress":
                progress.progress(JobProgress.model_validate(row["progress"]), row["trained_tokens"])
            else:
                progress.event(row["message"], level=row["level"], data=row.get("data"))


class FileProgress:
    """Rank 0's Progress inside torchrun: events to a JSONL file, stop = a CANCEL file exists."""

    def __init__(self, launch_dir: Path, main: bool):
        self.events = launch_dir / "events.jsonl"
        self.cancel = launch_dir / "CANCEL"
        self.main = main

    def _write(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.events, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self._write({"kind": "event", "message": message, "level": level, "data": data})

    def progress(self, p: JobProgress, trained_tokens: int) -> None:
        self._write({"kind": "progress", "progress": p.model_dump(mode="json"), "trained_tokens": trained_tokens})

    def should_stop(self) -> bool:
        return self.main and self.cancel.exists()


def main(argv: list[str] | None = None) -> int:
    _set_pdeathsig()
    from workers.training.recipe import TrainingRun, run_training

    run_file = Path((argv or sys.argv[1:])[0])
    cfg = json.loads(run_file.read_text())
    launch_dir = run_file.parent
    rank = int(os.environ.get("RANK", "0"))
    run = TrainingRun(job_id=cfg["job_id"], tenant=cfg["tenant"], base_model_ref=cfg["base_model_ref"],
                      spec=TrainingSpec.model_validate(cfg["spec"]),
                      train_conversations=lambda: _read_jsonl(Path(cfg["train"])),
                      validation_conversations=(lambda: _read_jsonl(Path(cfg["validation"])))
                      if cfg["validation"] else None,
                      work_dir=Path(cfg["work_dir"]), device=cfg["device"],
                      models_cache_dir=Path(cfg["models_cache_dir"]),
                      memory_budget_bytes=cfg["memory_budget_bytes"], keep_checkpoints=cfg["keep_checkpoints"],
                      base_model_id=cfg["base_model_id"])
    try:
        out = run_training(run, FileProgress(launch_dir, main=rank == 0))
    except (TrainingError, Cancelled) as exc:
        if rank == 0:
            (launch_dir / "error.json").write_text(json.dumps(
                {"type": type(exc).__name__, "code": exc.code, "message": exc.message, "param": exc.param}))
        return 1
    if out is not None:  # rank 0
        tmp = launch_dir / "outcome.json.tmp"
        tmp.write_text(out.to_json(), encoding="utf-8")
        os.replace(tmp, launch_dir / "outcome.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
