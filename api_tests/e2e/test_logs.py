"""Issue 6 item 4: structured logs carrying job and request ids.

The formatter (service/logging.py) on its own, then the live deployment's own log output:
`tuneserve api` writes one JSON object per line with the request id of every request (the
same id the client got in X-Request-ID, or sent itself); `tuneserve worker` writes JSON lines
that carry the job id on every line logged while that job trains (Celery's, the training
code's, the registry's)."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from e2e_harness import jsonl_bytes, sample_rows, wait_for
from service.logging import JsonFormatter, TextFormatter, configure_logging, log_context

pytestmark = [pytest.mark.e2e]


def _record(msg="hello %s", args=("world",), **extra) -> logging.LogRecord:
    rec = logging.LogRecord("tuneserve.test", logging.INFO, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_formatter_fields_extras_and_context():
    fmt = JsonFormatter("api")
    line = json.loads(fmt.format(_record(request_id="r-1", status=200, path=object())))
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "tuneserve.test"
    assert line["component"] == "api" and line["request_id"] == "r-1" and line["status"] == 200
    assert line["ts"].endswith("Z") and "job_id" not in line
    assert isinstance(line["path"], str)  # non-JSON extras are stringified, never raise
    with log_context(request_id="r-ctx", job_id="ftjob-ctx"):
        line = json.loads(fmt.format(_record()))
        assert line["request_id"] == "r-ctx" and line["job_id"] == "ftjob-ctx"
        # The record's own value wins over the context.
        assert json.loads(fmt.format(_record(job_id="ftjob-own")))["job_id"] == "ftjob-own"
    assert "request_id" not in json.loads(fmt.format(_record()))
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record()
        rec.exc_info = __import__("sys").exc_info()
    assert "ValueError: boom" in json.loads(fmt.format(rec))["exc_info"]


def test_text_format_and_configure(monkeypatch):
    with log_context(job_id="ftjob-t"):
        assert "[job_id=ftjob-t]" in TextFormatter().format(_record())
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    others = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate)
              for n in ("uvicorn", "uvicorn.error", "celery")}
    try:
        monkeypatch.setenv("TUNESERVE_LOG_FORMAT", "json")
        configure_logging("worker", "INFO", stream=stream)
        configure_logging("worker", "INFO", stream=stream)  # idempotent: one handler
        logging.getLogger("tuneserve.x").info("one", extra={"job_id": "ftjob-1"})
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert len(lines) == 1 and lines[0]["job_id"] == "ftjob-1" and lines[0]["component"] == "worker"
        monkeypatch.setenv("TUNESERVE_LOG_FORMAT", "text")
        configure_logging("api", "INFO", stream=stream)
        logging.getLogger("tuneserve.x").info("two", extra={"request_id": "abc"})
        assert stream.getvalue().splitlines()[-1].endswith("tuneserve.x [request_id=abc]: two")
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])
        for n, (handlers, propagate) in others.items():
            logging.getLogger(n).handlers, logging.getLogger(n).propagate = handlers, propagate
        logging.captureWarnings(False)


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # every JSON-looking line must parse
    return out


@pytest.mark.slow
def test_live_api_and_worker_logs_carry_request_and_job_ids(deployment):
    c = deployment.client()
    try:
        rid = f"e2e-logs-{uuid.uuid4().hex[:12]}"
        f = c.http.post("/v1/files", files={"file": ("logs.jsonl", jsonl_bytes(sample_rows(8)), "application/jsonl")},
                        data={"purpose": "fine-tune"}, headers={"X-Request-ID": rid})
        assert f.status_code == 200 and f.headers["x-request-id"] == rid
        r = c.http.post("/v1/fine_tuning/jobs", json={
            "model": deployment.base_model, "training_file": f.json()["id"],
            "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_source_length": 32, "max_target_length": 32,
                                "eval_max_samples": 0}})
        assert r.status_code == 200, r.text
        generated_rid, job_id = r.headers["x-request-id"], r.json()["id"]
        c.wait_job(job_id, {"succeeded"}, 300, deployment.system.logs)

        def api_lines():
            return [x for x in _json_lines(deployment.api.log()) if x.get("message") == "request"]
        lines = wait_for(lambda: [x for x in api_lines() if x.get("request_id") == generated_rid], 30,
                         "the API's request line")
        assert lines[0]["route"] == "/v1/fine_tuning/jobs" and lines[0]["method"] == "POST"
        assert lines[0]["status"] == 200 and lines[0]["component"] == "api" and "duration_ms" in lines[0]
        mine = [x for x in api_lines() if x.get("request_id") == rid]
        assert [(x["route"], x["status"]) for x in mine] == [("/v1/files", 200)]
        assert all(x.get("request_id") for x in api_lines())

        def job_lines():
            return [x for x in _json_lines(deployment.worker.log()) if x.get("job_id") == job_id]
        lines = wait_for(lambda: (ls := job_lines()) and any("succeeded" in x["message"] for x in ls) and ls, 30,
                         "the worker's lines for the job")
        messages = [x["message"] for x in lines]
        assert any(m.endswith("received") for m in messages), messages  # logged before the task runs
        assert any(m.startswith(f"train({job_id})") for m in messages), messages
        assert any("published adapter" in m for m in messages), messages
        assert all(x["component"] == "worker" for x in lines)
    finally:
        c.close()
