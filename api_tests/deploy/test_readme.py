"""The README's promises that drift silently: its first section is the two commands, its
settings table names every Settings field (and nothing that is not one), its hyperparameter
table every TrainingSpec field with its default, its dataset examples are valid rows, and its
curl walkthrough runs pasted as one block."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from service.core.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_first_section_is_the_two_commands():
    first = README.split("\n## ", 2)[1]
    assert first.startswith("Two commands")
    assert "make run" in first and "make test" in first


def test_settings_table_matches_settings():
    section = README.split("\n## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `TUNESERVE_([A-Z0-9_]+)` \|", section, flags=re.M))
    fields = {name.upper() for name in Settings.model_fields}
    assert fields - documented == set(), "settings missing from the README table"
    assert documented - fields == set(), "README documents settings that do not exist"


def test_sections_the_lead_fills_exist():
    assert "\n## Benchmarks\n" in README and "\n## Architecture\n" in README


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_hyperparameter_table_matches_training_spec():
    """Every TrainingSpec field is documented with its real default (plus OpenAI's multiplier)."""
    import json

    from service.core.domain import TrainingSpec

    rows = re.findall(r"^\| `([a-z_0-9]+)` \| ([^|]+) \|", _section("Hyperparameters"), flags=re.M)
    documented = {key: cell.strip() for key, cell in rows}
    assert set(documented) == set(TrainingSpec.model_fields) | {"learning_rate_multiplier"}
    for key, field in TrainingSpec.model_fields.items():
        cell = documented[key]
        assert cell.startswith("`") and cell.endswith("`"), (key, cell)
        assert json.loads(cell.strip("`")) == field.default, (key, cell, field.default)


def test_dataset_format_examples_are_valid_rows_of_their_format():
    import json

    from service.core.datasets import detect_format, row_problem
    from service.core.domain import DatasetFormat

    examples = re.findall(r"^\| [^|]+ \| `(\{.*\})` \|", _section("Datasets"), flags=re.M)
    formats = []
    for raw in examples:
        row = json.loads(raw)
        fmt = detect_format(row)
        assert fmt is not None and row_problem(row, fmt) is None, raw
        formats.append(fmt)
    assert sorted(formats) == sorted(DatasetFormat)


def _walkthrough() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", _section("Walkthrough: curl"), flags=re.S)
    assert len(blocks) == 1, "the curl walkthrough is one block to paste"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.e2e
def test_curl_walkthrough_runs_top_to_bottom(tmp_path):
    """The block pasted as is into bash (errexit + pipefail, stricter than a terminal) against a
    real API + worker on the demo model, from a directory laid out like the repository root:
    it waits for the job, chats with the adapter, cancels a running job, exports into a temp dir."""
    import shutil
    import subprocess
    import sys

    import redis

    e2e = Path(__file__).resolve().parents[1] / "e2e"
    sys.path.insert(0, str(e2e))
    try:
        from e2e_harness import KEY_A, SHARED_REDIS, System, cleanup_broker, shared_redis_db, wait_for
    finally:
        sys.path.remove(str(e2e))
    try:
        redis.Redis.from_url(SHARED_REDIS, socket_connect_timeout=1).ping()
    except Exception:
        pytest.skip("the machine's Redis at 127.0.0.1:6379 is required")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from service.models import build_demo_model

    system = System(root=tmp_path / "deployment", redis_url=f"{SHARED_REDIS}/{shared_redis_db()}",
                    base_model=build_demo_model(tmp_path / "models" / "tuneserve-demo-chatglm3-tiny"))
    root = tmp_path / "checkout"  # what the walkthrough reads: service/data/*.jsonl, .tuneserve/api_key
    (root / ".tuneserve").mkdir(parents=True)
    (root / "service").symlink_to(REPO_ROOT / "service")
    (root / ".tuneserve" / "api_key").write_text(KEY_A + "\n")
    api = system.start_api(wait=False)
    worker = system.start_worker(wait=False)
    try:
        system.wait_ready(api)
        wait_for(lambda: " ready." in worker.log() or not worker.alive(), 180, "worker ready",
                 diagnostics=lambda: worker.log()[-4000:])
        env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
        env["TUNESERVE_URL"] = api.url
        t0 = time.monotonic()
        res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _walkthrough()], cwd=root, env=env,
                             capture_output=True, text=True, timeout=540)
        print(f"walkthrough ran in {time.monotonic() - t0:.0f} s")
        out = res.stdout
        assert res.returncode == 0, out[-3000:] + res.stderr[-3000:] + system.logs()
        assert '"error"' not in out, out[-3000:]
        assert "succeeded" in res.stderr  # the wait loop's status lines
        assert '"object":"chat.completion"' in out.replace(" ", "") and "data: [DONE]" in out
        assert re.search(r"ftjob-[0-9a-f]+ cancelled", out)
        assert "adapter_model.safetensors" in out and "adapter_config.json" in out  # the zip's listing
        assert not list(root.glob("*.zip"))  # the export went to a temp dir, not the checkout
    finally:
        system.stop_all()
        try:
            cleanup_broker(system.redis_url, system.queue)
        except Exception:
            pass
