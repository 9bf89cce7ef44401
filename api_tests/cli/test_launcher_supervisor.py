"""`tuneserve up` as a supervisor (issue 11 items 2 and 9), with real processes: a crashed
worker or API is restarted with backoff while the rest keeps serving, repeated crashes make `up`
give up loudly, and a SIGKILLed `up` takes its children with it.

The API runs with the engine off (these tests are about processes, not the model), so it
starts in seconds; the worker is the real Celery worker."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
from harness import Up, free_port, pid_alive, process_env, wait_for

from service.launcher import RestartPolicy

pytestmark = pytest.mark.slow
START_TIMEOUT = 180


def test_backoff_doubles_per_recent_crash_and_is_capped():
    p = RestartPolicy(max_restarts=10, backoff_s=0.5, max_backoff_s=3)
    assert [p.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.fixture
def start_up(tmp_path, own_redis, demo_base):
    ups: list[Up] = []

    def start(*args: str, redis_url: str = own_redis.url, **env_overrides: str) -> Up:
        port = free_port()
        data = tmp_path / f"data{len(ups)}"
        env = process_env(data_dir=data, database_url=f"sqlite:///{data / 'tuneserve.db'}",
                          redis_url=redis_url, queue="training")
        env.update(TUNESERVE_PORT=str(port), TUNESERVE_BASE_MODEL=str(demo_base), TUNESERVE_ENGINE_ENABLED="false",
                   COLUMNS="200", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        env.update(env_overrides)
        log_path = tmp_path / f"up{len(ups)}.log"
        up = Up.start(list(args), env, log_path, port)
        ups.append(up)
        return up

    yield start
    for up in ups:
        up.stop()


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory) -> Path:
    from service.models import build_demo_model
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")


def _kill(pid: int) -> None:
    import os
    os.kill(pid, signal.SIGKILL)


def test_a_crashed_worker_or_api_is_restarted_and_the_rest_keeps_serving(start_up):
    up = start_up("--restart-backoff", "0.5")
    up.wait_up("up started")
    api_pid, worker_pid = up.pids("api")[0], up.pids("worker")[0]

    _kill(worker_pid)
    # While the worker is down and coming back, the API keeps answering (it was never stopped).
    wait_for(lambda: "worker exited with code -9; restarting in 0.5 s (restart 1 of 5 in 60 s)" in up.log(),
             30, "the supervisor to report the worker's crash", diagnostics=lambda: up.log()[-4000:])
    assert up.healthy() and pid_alive(api_pid)
    up.wait_up("the worker restarted", workers=2)
    assert up.pids("api") == [api_pid] and pid_alive(api_pid)
    assert not pid_alive(worker_pid) and pid_alive(up.pids("worker")[1])

    _kill(api_pid)
    wait_for(lambda: "api exited with code -9; restarting in 0.5 s (restart 1 of 5 in 60 s)" in up.log(),
             30, "the supervisor to report the API's crash", diagnostics=lambda: up.log()[-4000:])
    up.wait_up("the API restarted", workers=2, apis=2)
    assert pid_alive(up.pids("worker")[1]), "the worker was stopped with the API"
    assert up.proc.poll() is None

    up.proc.send_signal(signal.SIGINT)  # Ctrl-C: the only way (with SIGTERM) to stop everything
    assert up.proc.wait(60) == 0, up.log()[-4000:]
    assert "stopping tuneserve" in up.log()
    assert not any(pid_alive(p) for p in up.pids("worker") + up.pids("api"))


def test_repeated_crashes_make_up_give_up_loudly(start_up):
    up = start_up("--max-restarts", "1", "--restart-window", "600", "--restart-backoff", "0.2")
    up.wait_up("up started")
    _kill(up.pids("worker")[0])
    up.wait_up("the worker restarted once", workers=2)
    api_pid = up.pids("api")[0]
    _kill(up.pids("worker")[1])  # the second crash in the window: one more than allowed
    code = up.proc.wait(60)
    out = up.log()
    assert code == 1, out[-4000:]
    assert "worker exited with code -9: 2 crashes in 600 s, more than the 1 restarts allowed; giving up, stopping tuneserve" in out, out[-4000:]
    assert len(up.pids("worker")) == 2  # not restarted a second time
    wait_for(lambda: not pid_alive(api_pid), 30, "the API to be stopped with up")


def test_children_die_with_a_sigkilled_up(start_up):
    up = start_up()
    up.wait_up("up started")
    children = up.pids("api") + up.pids("worker")
    assert all(pid_alive(p) for p in children)
    up.proc.send_signal(signal.SIGKILL)
    up.proc.wait(10)
    wait_for(lambda: not any(pid_alive(p) for p in children), 30, "up's children to exit with it",
             diagnostics=lambda: f"alive: {[p for p in children if pid_alive(p)]}\n{up.log()[-3000:]}")
    assert not up.healthy()


def test_the_redis_up_started_itself_is_restarted_too(start_up):
    from service.launcher import redis_ping
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there: up starts redis-server
    up = start_up("--restart-backoff", "0.2", redis_url=url)
    up.wait_up("up started")
    assert "starting redis-server" in up.log() and redis_ping(url)
    _kill(up.pids("redis")[0])
    wait_for(lambda: len(up.pids("redis")) == 2 and redis_ping(url), 60, "redis restarted",
             diagnostics=lambda: up.log()[-4000:])
    assert "redis exited with code -9; restarting in 0.2 s (restart 1 of 5 in 60 s)" in up.log()
    up.wait_up("the worker back on the new redis")
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(60) == 0, up.log()[-4000:]
    assert not redis_ping(url, timeout=0.2)


def test_the_terminal_has_no_loading_bar_and_no_celery_root_warning(start_up):
    """What `make run` shows (issue 14, section 5): the API's engine loads the base (the demo
    model, engine on) and the real Celery worker starts, as root where this runs as root, yet
    the terminal has neither transformers' "Loading weights" bar nor Celery's superuser
    SecurityWarning (both are printed to the children's stderr, which is this terminal)."""
    import os

    import httpx

    up = start_up(TUNESERVE_ENGINE_ENABLED="true")
    up.wait_up("up started")

    def engine_ready():
        r = httpx.get(f"{up.url}/readyz", timeout=5)
        assert r.json()["checks"]["engine"] in ("loading", "ready"), r.text
        return r.json()["checks"]["engine"] == "ready"
    wait_for(engine_ready, START_TIMEOUT, "the engine to load the demo base", diagnostics=lambda: up.log()[-4000:])
    terminal = up.log()
    assert "Loading weights" not in terminal, terminal[-4000:]
    assert "superuser privileges" not in terminal, terminal[-4000:]
    assert "SecurityWarning" not in terminal, terminal[-4000:]
    print(f"\nran as uid {os.geteuid()} (the Celery warning only fires as root)")
