"""The one broker contract between the API and the workers: the training task's name and
how it is sent. Light (no celery or torch import), so the API, the worker, the reaper and
the log formatter all read it from here."""
from __future__ import annotations

TRAIN_TASK = "tuneserve.train"


def send_train(app, queue: str, job_id: str) -> None:
    """Send train(job_id) by name on `app` (a Celery app): the task id is the job id, so a
    redelivered or re-sent job is recognisable in the broker and in the logs."""
    app.send_task(TRAIN_TASK, args=[job_id], queue=queue, task_id=job_id, retry=True)
