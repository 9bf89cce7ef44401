"""Helpers for the training-core tests: a recording Progress, sample conversations, TrainingRun."""
from __future__ import annotations

import json
from pathlib import Path

from service.core.domain import JobProgress

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"
SAMPLE = Path(__file__).resolve().parents[2] / "service" / "data" / "advertisegen_sample.jsonl"


class RecordingProgress:
    """A Progress that records everything and can stop (cancel) or crash at a given step."""

    def __init__(self, stop_after_steps: int | None = None, crash_after_step: int | None = None):
        self.events: list[tuple[str, str, dict | None]] = []
        self.progresses: list[JobProgress] = []
        self.stop_checks = 0
        self.stop_after_steps = stop_after_steps
        self.crash_after_step = crash_after_step

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append((level, message, data))

    def progress(self, p: JobProgress, trained_tokens: int) -> None:
        self.progresses.append(p)
        if self.crash_after_step is not None and p.step >= self.crash_after_step:
            raise KeyboardInterrupt(f"simulated crash after step {p.step}")  # like a killed worker

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop_after_steps is not None and self.stop_checks > self.stop_after_steps

    def messages(self, level: str | None = None) -> list[str]:
        return [m for lv, m, _ in self.events if level is None or lv == level]


def conversations(n: int, offset: int = 0) -> list[list[dict]]:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[offset: offset + n]
    return [[{"role": "user", "content": r["content"]}, {"role": "assistant", "content": r["summary"]}]
            for r in rows]



def make_run(tmp_path: Path, models_cache: Path, spec, train, validation=None, **kw):
    from workers.training import TrainingRun

    return TrainingRun(job_id="ftjob-test", tenant="t1", base_model_ref=str(FIXTURE), spec=spec,
                       train_conversations=train, validation_conversations=validation,
                       work_dir=tmp_path / "job", device="cpu", models_cache_dir=models_cache, **kw)
