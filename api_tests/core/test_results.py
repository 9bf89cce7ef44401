"""service/core/results.py: the metrics CSV built from a job's events."""
from __future__ import annotations

from datetime import datetime, timezone

from service.core.domain import JobEvent
from service.core.results import COLUMNS, metrics_csv, metrics_rows


def _ev(data, type_="metrics"):
    return JobEvent(id="e", job_id="j", created_at=datetime.now(timezone.utc), type=type_, message="m", data=data)


def test_rows_merge_training_and_validation_by_step_and_later_runs_win():
    events = [_ev({"step": 1, "loss": 3.0}), _ev({"step": 2, "loss": 2.0}),
              _ev({"step": 2, "eval_loss": 2.5}), _ev({"step": 2, "loss": 1.9}),  # resumed run repeats step 2
              _ev({"message_only": True}), _ev(None), _ev({"step": 3, "loss": float("nan")}),
              _ev({"step": 4, "loss": 9.0}, type_="message"), _ev({"step": "5", "loss": 1.0})]
    rows = metrics_rows(events)
    assert rows == [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 1.9, "valid_loss": 2.5}]
    text = metrics_csv(rows)
    assert text.splitlines() == [",".join(COLUMNS), "1,3.0,,,", "2,1.9,,2.5,"]


def test_no_metrics_is_a_header_only_file():
    assert metrics_csv(metrics_rows([])) == ",".join(COLUMNS) + "\n"
