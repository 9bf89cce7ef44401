"""`tuneserve up` sets TUNESERVE_LOG_DIR for its children: every line goes as JSON to
<dir>/<component>.log, and the terminal (stderr) keeps one short line per job transition."""
import io
import json
import logging

from service.logging import configure_logging

from .conftest import AUTH_A, BASE, upload_ok


def test_log_dir_gets_every_line_and_the_terminal_one_line_per_transition(client, tmp_path, monkeypatch):
    log_dir = tmp_path / "logs"
    monkeypatch.setenv("TUNESERVE_LOG_DIR", str(log_dir))
    monkeypatch.delenv("TUNESERVE_LOG_LEVEL", raising=False)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    terminal = io.StringIO()
    try:
        configure_logging("api", stream=terminal)
        file_id = upload_ok(client)
        r = client.post("/v1/fine_tuning/jobs", headers=AUTH_A,
                        json={"model": BASE, "training_file": file_id, "hyperparameters": {"max_steps": 2}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH_A).status_code == 200
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
                h.close()
        root.setLevel(saved[1])

    lines = terminal.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].endswith(f"api: job {job_id}: created (queued)")
    assert lines[1].endswith(f"api: job {job_id}: queued -> cancelled")
    records = [json.loads(line) for line in (log_dir / "api.log").read_text().splitlines()]
    assert {"request"} <= {r["message"] for r in records}  # request lines: file only
    assert any(r["message"] == f"job {job_id}: queued -> cancelled" and r["job_id"] == job_id for r in records)
