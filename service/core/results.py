"""A finished job's result file: the metrics CSV OpenAI attaches as `result_files`
(`step,train_loss,train_mean_token_accuracy,valid_loss,valid_mean_token_accuracy`), built from
the job's events, stored as one of the tenant's files."""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from collections.abc import Iterable
from pathlib import Path

from service.core.domain import FileInfo, Job, JobEvent

RESULTS_PURPOSE = "fine-tune-results"
COLUMNS = ("step", "train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
# Where each column's value is found in an event's data (training does not measure token
# accuracy today: those columns stay empty rather than invented).
_SOURCES = {"train_loss": "loss", "train_mean_token_accuracy": "mean_token_accuracy",
            "valid_loss": "eval_loss", "valid_mean_token_accuracy": "eval_mean_token_accuracy"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metrics_rows(events: Iterable[JobEvent]) -> list[dict[str, float | int | None]]:
    """One row per step that has any metric, in step order; a later event for a step wins
    (a resumed run repeats the steps after its checkpoint)."""
    by_step: dict[int, dict[str, float | int | None]] = {}
    for event in events:
        data = event.data or {}
        if not isinstance(data.get("step"), int):
            continue
        values = {col: data[key] for col, key in _SOURCES.items() if _finite(data.get(key))}
        if event.type != "metrics":  # only the per-step metrics events carry the training loss
            values.pop("train_loss", None)
        if values:
            row = by_step.setdefault(data["step"], {"step": data["step"]})
            row.update(values)
    return [by_step[s] for s in sorted(by_step)]


def metrics_csv(rows: list[dict[str, float | int | None]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v for k, v in row.items() if v is not None})
    return buf.getvalue()


def write_results_file(store, files_dir: Path, job: Job) -> FileInfo:
    """Write the job's metrics CSV beside the uploads (temp file + rename) and register it as
    the tenant's file with purpose `fine-tune-results`."""
    rows = metrics_rows(store.all_events(job.id))
    data = metrics_csv(rows).encode("utf-8")
    files_dir.mkdir(parents=True, exist_ok=True)
    path = files_dir / f"{job.id}-step_metrics.csv"
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return store.create_file(tenant=job.tenant, filename="step_metrics.csv", purpose=RESULTS_PURPOSE,
                             bytes=len(data), rows=len(rows), format=None,
                             sha256=hashlib.sha256(data).hexdigest(), path=path)


def discard_results_file(store, info: FileInfo) -> None:
    """Undo write_results_file (the job did not reach succeeded after all)."""
    store.delete_file(info.id, info.tenant)
    Path(info.path).unlink(missing_ok=True)
