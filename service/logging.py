"""Structured logs for `tuneserve api` and `tuneserve worker`: one JSON object per line on
stderr, carrying the request id and the job id wherever they are known.

    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "tuneserve.api",
     "message": "request", "component": "api", "pid": 123, "request_id": "9f...",
     "method": "POST", "route": "/v1/fine_tuning/jobs", "status": 200, "duration_ms": 12.5}

Where the ids come from, first hit wins:
  * the record's own attributes (`log.info(..., extra={"request_id": rid, "job_id": jid})`);
  * the context variables `request_id_var` / `job_id_var` (set them with `log_context(...)`
    around a piece of work; asyncio tasks and threads started inside inherit them);
  * in a worker, the Celery task being executed: `tuneserve.train(job_id)` is sent with the
    job id as its task id, so every line logged while a job trains carries that job id,
    including the lines of Celery, transformers and the training code; Celery's
    "Task tuneserve.train[...] received" line carries it too.

`TUNESERVE_LOG_FORMAT`: `json`, `text` (a readable line with the same ids), or `auto` (the
default: text on a terminal, JSON otherwise, so `make run` stays readable and deployments
log JSON). `TUNESERVE_LOG_LEVEL` overrides the level.

`TUNESERVE_LOG_DIR` (set by `tuneserve up` for its children): every line goes as JSON to
`<dir>/<component>.log`, and stderr keeps only one short line per job transition (the
`tuneserve.jobs` logger) and errors, so the terminal of `make run` stays readable.

The worker: Celery configures logging before it imports anything but the app module, so the
hook has to be installed before Celery starts. `python -m service.logging ARGS` is Celery's own
command line (`celery ARGS`) with this module's `setup_logging` receiver connected first;
`tuneserve worker` runs the worker that way.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from service.core.tasks import TRAIN_TASK

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuneserve_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuneserve_job_id", default=None)

# Attributes every LogRecord has; anything else on a record is an `extra` worth keeping.
# (uvicorn's `color_message` is its message again with ANSI colours.)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName", "color_message"}
_HANDLER_NAME = "tuneserve"
# One line per job transition (store.transition, job creation): what `make run`'s terminal shows.
JOB_LOGGER = "tuneserve.jobs"


@contextlib.contextmanager
def log_context(*, request_id: str | None = None, job_id: str | None = None) -> Iterator[None]:
    """Attach ids to every line logged inside the block (this task/thread and its children)."""
    tokens = []
    if request_id is not None:
        tokens.append((request_id_var, request_id_var.set(request_id)))
    if job_id is not None:
        tokens.append((job_id_var, job_id_var.set(job_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def _celery_job_id() -> str | None:
    """The job id of the Celery task running in this thread, if any (no import of Celery here:
    only a process that already runs Celery can be inside a task)."""
    if "celery" not in sys.modules:
        return None
    try:
        from celery._state import get_current_task
        task = get_current_task()
        if task is None or task.request is None:
            return None
        if task.name == TRAIN_TASK and task.request.args:
            return str(task.request.args[0])
        return task.request.id
    except Exception:  # logging must never raise
        return None


def _celery_record_job_id(record: logging.LogRecord) -> str | None:
    """Celery's own task lines ("Task tuneserve.train[<id>] received / succeeded") carry the
    task in `data`; "received" is logged before the task runs, outside its context."""
    data = getattr(record, "data", None)
    if isinstance(data, dict) and data.get("name") == TRAIN_TASK and data.get("id"):
        return str(data["id"])
    return None


def record_ids(record: logging.LogRecord) -> dict[str, str]:
    ids: dict[str, str] = {}
    rid = getattr(record, "request_id", None) or request_id_var.get()
    if rid:
        ids["request_id"] = str(rid)
    jid = getattr(record, "job_id", None) or job_id_var.get() or _celery_record_job_id(record) or _celery_job_id()
    if jid:
        ids["job_id"] = str(jid)
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per record; extras kept (non-JSON values as their str())."""

    def __init__(self, component: str | None = None):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.component:
            out["component"] = self.component
        out["pid"] = record.process
        out.update(record_ids(record))
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable, with the same ids in brackets."""

    def __init__(self, component: str | None = None):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(ids)s: %(message)s")
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        ids = record_ids(record)
        record.ids = (" [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]") if ids else ""
        try:
            return super().format(record)
        finally:
            del record.ids


def _want_json(stream) -> bool:
    fmt = os.environ.get("TUNESERVE_LOG_FORMAT", "auto").strip().lower()
    if fmt in ("json", "text"):
        return fmt == "json"
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


class TerminalFilter(logging.Filter):
    """Beside a log file: job transitions and errors only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == JOB_LOGGER or record.levelno >= logging.ERROR


class ShortFormatter(logging.Formatter):
    """`12:00:01 worker: job ftjob-… running -> succeeded` (errors keep their traceback)."""

    def __init__(self, component: str | None = None):
        super().__init__(f"%(asctime)s {component or '-'}: %(message)s", datefmt="%H:%M:%S")


def configure_logging(component: str, level: str | int | None = "INFO", stream=None) -> None:
    """Root logger -> one stderr handler with our formatter (plus the log file of
    TUNESERVE_LOG_DIR, see the module docstring). Idempotent. uvicorn's and Celery's loggers
    propagate here (run uvicorn with log_config=None, access_log=False: the API's own request
    line, with the request id, route template, status and duration, replaces uvicorn's access
    line)."""
    stream = stream or sys.stderr
    level = os.environ.get("TUNESERVE_LOG_LEVEL") or level or "INFO"
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        level = level if isinstance(level, int) else logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "name", None) == _HANDLER_NAME:
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    log_dir = os.environ.get("TUNESERVE_LOG_DIR", "").strip()
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        to_file = logging.FileHandler(os.path.join(log_dir, f"{component}.log"), encoding="utf-8")
        to_file.set_name(_HANDLER_NAME)
        to_file.setFormatter(JsonFormatter(component))
        root.addHandler(to_file)
        handler.addFilter(TerminalFilter())
        handler.setFormatter(ShortFormatter(component))
    else:
        handler.setFormatter(JsonFormatter(component) if _want_json(stream) else TextFormatter(component))
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "celery"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)


def _celery_setup_logging(loglevel=None, **_kw) -> None:
    configure_logging("worker", loglevel)


# Celery's check_privileges (celery/platforms.py, run by the worker before logging is set up, so
# it lands raw on `make run`'s terminal) warns on every start as root, e.g. in a container.
# Its real guard stays: as root with pickle accepted it raises SecurityError unless C_FORCE_ROOT
# is set (C_FORCE_ROOT does not silence this warning). Our app accepts JSON only.
ROOT_WARNING = r"You're running the worker with superuser privileges"


def silence_celery_root_warning() -> None:
    """Ignore exactly Celery's "running the worker with superuser privileges" SecurityWarning
    (no other warning, no other SecurityWarning such as the missing-group one)."""
    import warnings

    from celery.exceptions import SecurityWarning
    warnings.filterwarnings("ignore", message=ROOT_WARNING, category=SecurityWarning)


def celery_main(argv: list[str] | None = None) -> None:
    """`celery ARGS` with our logging (see the module docstring)."""
    from celery import signals
    from celery.__main__ import main

    silence_celery_root_warning()
    signals.setup_logging.connect(_celery_setup_logging, weak=False)
    sys.argv = ["celery", *(sys.argv[1:] if argv is None else argv)]
    main()


if __name__ == "__main__":
    celery_main()
