"""Log lines written while a request is served carry its request id, and job routes log the
job id: the JSON formatter is applied at emit time, as in `tuneserve api`."""
import json
import logging

from .conftest import AUTH_A, BASE, upload_ok
from service.logging import JsonFormatter


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter(component="api"))
        self.lines: list[dict] = []

    def emit(self, record):
        self.lines.append(json.loads(self.format(record)))


def test_job_lines_carry_request_and_job_ids(client):
    handler = _Collect()
    logger = logging.getLogger("tuneserve")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        file_id = upload_ok(client)
        r = client.post("/v1/fine_tuning/jobs", headers={**AUTH_A, "X-Request-ID": "req-create-1"},
                        json={"model": BASE,
                              "training_file": file_id, "hyperparameters": {"max_steps": 2}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        r = client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers={**AUTH_A, "X-Request-ID": "req-cancel-1"})
        assert r.status_code == 200, r.text
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    created = [l for l in handler.lines if l["message"] == "job created and enqueued"]
    assert created and created[0]["job_id"] == job_id and created[0]["request_id"] == "req-create-1"
    cancelled = [l for l in handler.lines if l["message"].startswith("job cancel requested")]
    assert cancelled and cancelled[0]["job_id"] == job_id and cancelled[0]["request_id"] == "req-cancel-1"
