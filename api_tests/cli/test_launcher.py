"""`tuneserve up` pieces (model choice, Redis, first-run key) and the whole `up` as a process."""
from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.core.config import CHATGLM3_HUB_ID, Settings
from service.launcher import (DEMO_BANNER, LaunchError, Launcher, choose_base_model, ensure_default_key, key_curl,
                              redis_ping, start_redis)
from harness import free_port

REPO = Path(__file__).resolve().parents[2]


def test_model_choice_follows_design(cli_env):
    assert choose_base_model(Settings(base_model="/models/mine")).model == "/models/mine"
    choice = choose_base_model(Settings(), has_cuda=True)
    assert choice.model == CHATGLM3_HUB_ID and not choice.demo
    choice = choose_base_model(Settings(), has_cuda=False)
    assert choice.demo
    demo = Path(choice.model)
    assert demo == (cli_env / "models" / "demo").absolute()
    assert (demo / "config.json").is_file() and (demo / "model.safetensors").is_file()
    # Second start reuses what the first built.
    mtime = (demo / "model.safetensors").stat().st_mtime_ns
    assert choose_base_model(Settings(), has_cuda=False).model == choice.model
    assert (demo / "model.safetensors").stat().st_mtime_ns == mtime


def test_first_run_key_is_created_saved_0600_and_reused(cli_env):
    from service.core.store import Store
    settings = Settings()
    key, created = ensure_default_key(settings)
    assert created
    path = cli_env / "api_key"
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_default_key(settings) == (key, False)

    store = Store(settings.resolved_database_url)
    try:
        assert store.tenant_for_key(key) == "default"
        store.revoke_api_key(store.list_api_keys("default")[0].id)
    finally:
        store.close()
    new_key, created = ensure_default_key(settings)  # a revoked saved key is replaced
    assert created and new_key != key and path.read_text().strip() == new_key


def test_key_panel_curl_is_one_paste_able_line_on_a_narrow_terminal(cli_env):
    """The curl example is printed outside the panel, unwrapped, without markup or colours."""
    import io

    from rich.console import Console

    settings = Settings()
    key = "tsk-" + "k" * 48
    out = io.StringIO()
    Launcher(console=Console(file=out, width=40, color_system=None))._announce_key(settings, key, True)
    curl = key_curl(settings, key)
    assert len(curl) > 40 and curl in out.getvalue().splitlines()
    assert curl == f"curl -H 'Authorization: Bearer {key}' http://127.0.0.1:8000/v1/models"


def test_starts_a_private_redis_when_none_answers(tmp_path):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_ping(url, timeout=0.2)
    proc = start_redis(url, tmp_path / "redis.log")
    try:
        assert redis_ping(url)
    finally:
        proc.terminate()
        proc.wait(10)
    assert not redis_ping(url, timeout=0.2)


def test_without_redis_server_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server anywhere
    with pytest.raises(LaunchError) as info:
        start_redis(f"redis://127.0.0.1:{free_port()}/0", tmp_path / "redis.log")
    assert "apt-get install redis-server" in str(info.value) and "brew install redis" in str(info.value)


def test_remote_redis_that_does_not_answer_is_not_started(tmp_path):
    with pytest.raises(LaunchError, match="not on this machine"):
        start_redis("redis://10.255.255.1:6379/0", tmp_path / "redis.log")


def test_up_refuses_a_taken_port_before_starting_anything(cli_env, runner):
    from service.cli import app
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = runner.invoke(app, ["up", "--port", str(port)])
    assert res.exit_code == 1
    assert f"127.0.0.1:{port} is already in use" in res.output
    assert not (cli_env / "api_key").exists()  # nothing started, nothing created


@pytest.mark.slow
def test_up_starts_everything_and_ctrl_c_stops_it(tmp_path):
    """The real `tuneserve up`: demo model banner, its own redis-server (the configured port has
    none), a key, API answering with the key, a worker; SIGINT stops every child."""
    port, redis_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNESERVE_")}
    env.update(TUNESERVE_DATA_DIR=str(tmp_path / "data"), TUNESERVE_REDIS_URL=redis_url,
               TUNESERVE_PORT=str(port), COLUMNS="200", CUDA_VISIBLE_DEVICES="")
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up"], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("API never answered:\n" + Path(log.name).read_text())
        out = Path(log.name).read_text()
        assert "SMOKE-TEST DEMO MODEL" in out and "answers are gibberish" in out
        assert "OpenAI base_url" in out
        assert "starting redis-server" in out and redis_ping(redis_url)
        key = (tmp_path / "data" / "api_key").read_text().strip()
        assert key in out
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert models.status_code == 200, models.text
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401

        # The CLI against it, as a user would after `make run`: the saved key is the default.
        def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "service.cli", *args, "--url", base], cwd=tmp_path,
                                  env=env, capture_output=True, text=True, timeout=timeout)

        sample = REPO / "service" / "data" / "advertisegen_sample.jsonl"
        res = cli("jobs", "create", "--file", str(sample), "--suffix", "smoke", "--hp", "max_steps=2",
                  "--hp", "batch_size=2", "--hp", "eval_max_samples=0", "--follow")
        assert res.returncode == 0, res.stdout + res.stderr + Path(log.name).read_text()[-4000:]
        assert "succeeded" in res.stdout and "ft-smoke-" in res.stdout
        adapter = next(w for w in res.stdout.split() if w.startswith("ft-smoke-"))
        res = cli("chat", "--adapter", adapter, "-m", "类型#裙*材质#蕾丝", "--max-tokens", "8", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.strip()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = Path(log.name).read_text()
    assert code == 0, out
    assert "stopping tuneserve" in out
    assert not redis_ping(redis_url, timeout=0.2)  # its redis went with it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/healthz", timeout=1)
    assert DEMO_BANNER.split(":")[0] in out
