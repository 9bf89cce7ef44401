"""`tuneserve up` (what `make run` starts): the embedded single-machine deployment.

1. Pick the base model (TUNESERVE_BASE_MODEL; else ChatGLM3-6B with a CUDA GPU; else a tiny
   demo model built locally) and say loudly which.
2. Redis: use the one at TUNESERVE_REDIS_URL if it answers; else start `redis-server` as a
   child; else say what to install and stop.
3. First run: an API key for tenant "default", saved to $TUNESERVE_DATA_DIR/api_key (0600).
4. Start one training worker and the API as child processes and supervise them: a child that
   exits is restarted with backoff (RestartPolicy), `up` gives up (exit 1) after too many crashes
   in a short window; Ctrl-C / SIGTERM stop all children cleanly; children die with `up` even
   when it is SIGKILLed (PR_SET_PDEATHSIG).

Children get the decisions through the environment (TUNESERVE_BASE_MODEL, ...), so the API
and the worker read the same Settings as any other deployment.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from rich.console import Console
from rich.panel import Panel

from service.cli_client import API_KEY_FILE
from service.core import identity
from service.core.config import Settings

DEMO_BANNER = ("SMOKE-TEST DEMO MODEL: tiny random weights, answers are gibberish; "
               "set TUNESERVE_BASE_MODEL for a real model")
DEFAULT_TENANT = "default"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}


class LaunchError(Exception):
    """Something `up` cannot work around; the message says what to do."""


@dataclass
class BaseModelChoice:
    model: str
    reason: str
    demo: bool = False


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def choose_base_model(settings: Settings, *, has_cuda: bool | None = None) -> BaseModelChoice:
    """DESIGN.md's rule (service.core.identity.chosen_ref, as the engine applies it), with the
    reason to say. Builds the demo model (once) when it is the choice."""
    if settings.base_model:
        return BaseModelChoice(identity.chosen_ref(settings, has_cuda=False), "TUNESERVE_BASE_MODEL")
    has_cuda = cuda_available() if has_cuda is None else has_cuda
    ref = identity.chosen_ref(settings, has_cuda=has_cuda)
    if has_cuda:
        return BaseModelChoice(ref, "a CUDA GPU is present")
    demo = Path(ref)
    if not (demo / "config.json").exists():
        from service.models import build_demo_model
        demo = Path(build_demo_model(demo))
    return BaseModelChoice(str(demo.absolute()), "no CUDA GPU and no TUNESERVE_BASE_MODEL", demo=True)


# ---------------------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------------------
def redis_ping(url: str, timeout: float = 1.0) -> bool:
    import redis
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.exceptions.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_install_hint() -> str:
    return ("no Redis answers and `redis-server` is not installed. Install it: "
            "`sudo apt-get install redis-server` (Debian/Ubuntu) or `brew install redis` (macOS), "
            "or point TUNESERVE_REDIS_URL at a running Redis.")


def start_redis(url: str, log_path: Path) -> subprocess.Popen:
    """A private, non-persistent redis-server on the URL's port (the broker only holds task
    ids; the store is the truth), as our child so Ctrl-C stops it too."""
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    if host not in LOCAL_HOSTS:
        raise LaunchError(f"Redis at {url} does not answer and is not on this machine; start it or fix "
                          "TUNESERVE_REDIS_URL")
    binary = shutil.which("redis-server")
    if binary is None:
        raise LaunchError(redis_install_hint())
    port = str(parsed.port or 6379)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    proc = subprocess.Popen([binary, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,  # Ctrl-C must not stop it before the worker
                            preexec_fn=die_with_parent())  # noqa: PLW1509 (`up` runs no threads)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if redis_ping(url, timeout=0.5):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.terminate()
    raise LaunchError(f"started redis-server on port {port} but it did not answer; see {log_path}")


def check_port_free(host: str, port: int) -> None:
    """Fail before starting anything when the API's port is taken (uvicorn would exit later,
    after Redis and the worker had started)."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise LaunchError(f"{host}:{port} is already in use ({exc.strerror}); stop what listens there "
                              "or pick another port: --port N / TUNESERVE_PORT=N") from exc


# ---------------------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------------------
def ensure_default_key(settings: Settings) -> tuple[str, bool]:
    """The key saved in data_dir/api_key if the store still accepts it, else a new one for
    tenant "default" (saved 0600). Returns (key, created)."""
    from service.core.store import Store
    path = settings.data_dir / API_KEY_FILE
    store = Store(settings.resolved_database_url)
    try:
        if path.exists():
            key = path.read_text(encoding="utf-8").strip()
            if key and store.tenant_for_key(key):
                return key, False
        key, _ = store.create_api_key(DEFAULT_TENANT, name="make run")
    finally:
        store.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create with 0600 from the start: the key is never world-readable, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    return key, True


# ---------------------------------------------------------------------------------------
# Supervisor
# ---------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen preexec_fn that makes the child receive `sig` when `up` dies, even by SIGKILL
    (children run in their own sessions, so nothing else would reach them). Linux only: returns
    None elsewhere, where `up` still stops its children on every exit it survives."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: no dlopen in the child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig))
        if os.getppid() != parent:  # `up` died between fork and prctl: nobody would signal us
            os.kill(os.getpid(), sig)
    return preexec


@dataclass(frozen=True)
class RestartPolicy:
    """Crashes of one child: restart after `backoff_s`, doubling per crash still inside the last
    `window_s` (capped); one crash more than `max_restarts` inside the window and `up` gives up."""
    max_restarts: int = 5
    window_s: float = 60.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def delay(self, recent: int) -> float:
        return min(self.backoff_s * 2 ** (recent - 1), self.max_backoff_s)


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    crashes: deque[float] = field(default_factory=deque)  # monotonic times inside the window
    restart_at: float | None = None


def spawn(argv: list[str], env: dict[str, str], stdout: Path | None = None) -> subprocess.Popen:
    # Own session: a terminal Ctrl-C reaches only `up`, which stops children in order, and each
    # child is one process group we can stop whole; die_with_parent covers `up` being killed.
    out = stdout.open("ab") if stdout is not None else None
    try:
        return subprocess.Popen(argv, env=env, start_new_session=True, stdout=out,
                                preexec_fn=die_with_parent())  # noqa: PLW1509 (`up` runs no threads)
    finally:
        if out is not None:
            out.close()  # the child holds its own descriptor


def key_curl(settings: Settings, key: str) -> str:
    """The one-line curl `up` prints under the key panel."""
    return f"curl -H 'Authorization: Bearer {key}' http://{settings.host}:{settings.port}/v1/models"


@dataclass
class Launcher:
    console: Console = field(default_factory=Console)
    with_worker: bool = True
    overrides: dict[str, object] = field(default_factory=dict)  # --host / --port
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    children: list[Child] = field(default_factory=list)
    _stopping: bool = False

    def run(self) -> int:
        from pydantic import ValidationError
        try:
            settings = Settings(**self.overrides)
        except ValidationError as exc:
            raise LaunchError("invalid TUNESERVE_* settings: "
                              + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors()))
        check_port_free(settings.host, settings.port)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        logs = settings.data_dir / "logs"

        choice = choose_base_model(settings)
        self._announce_model(choice)
        # Children read the same decisions through their own Settings.
        # Children log to files under logs/ and keep only a line per job transition (and errors)
        # on this terminal (service.logging); their stdout (Celery's banner) goes to logs/ too.
        env = dict(os.environ, TUNESERVE_BASE_MODEL=choice.model, TUNESERVE_HOST=settings.host,
                   TUNESERVE_PORT=str(settings.port), TUNESERVE_LOG_DIR=str(logs.absolute()))
        logs.mkdir(parents=True, exist_ok=True)

        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            if redis_ping(settings.redis_url):
                self.console.print(f"redis: using {settings.redis_url}")
            else:
                self.console.print(f"redis: nothing answers at {settings.redis_url}; starting redis-server")
                self._add("redis", lambda: start_redis(settings.redis_url, logs / "redis.log"))

            key, created = ensure_default_key(settings)
            self._announce_key(settings, key, created)

            if self.with_worker:
                from service.cli import worker_argv
                argv = worker_argv(settings.task_queue, 1)
                self._add("worker", lambda: spawn(argv, env, stdout=logs / "worker.out"))
            self._add("api", lambda: spawn([sys.executable, "-m", "service.cli", "api"], env,
                                           stdout=logs / "api.out"))
            base = f"http://{settings.host}:{settings.port}"
            model_line = (f"[bold red]model: SMOKE-TEST DEMO MODEL ({choice.model}), answers are gibberish[/]"
                          if choice.demo else f"model: {choice.model}")
            p = self.policy
            self.console.print(Panel(
                f"API + dashboard: [bold]{base}/[/]\nOpenAI base_url: {base}/v1\n{model_line}\n"
                f"data: {settings.data_dir.absolute()}\nlogs: {logs.absolute()}/{{api,worker}}.log "
                "(JSON; below: one line per job transition, and errors)\n"
                f"a crashed child is restarted (at most {p.max_restarts} times in {p.window_s:g} s)\n"
                "Ctrl-C stops everything.", title="tuneserve up", expand=False))
            return self._supervise()
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- output ----------------------------------------------------------------------------
    def _say(self, message: str) -> None:
        # One line per event, never wrapped: operators and tests grep these.
        self.console.print(message, soft_wrap=True, highlight=False)

    def _announce_model(self, choice: BaseModelChoice) -> None:
        if choice.demo:
            self.console.print(Panel(f"[bold]{DEMO_BANNER}[/]\nmodel: {choice.model}\n"
                                     f"(chosen because: {choice.reason})",
                                     title="[bold red]!! SMOKE-TEST DEMO MODEL !![/]", border_style="red",
                                     expand=False))
        else:
            self.console.print(Panel(f"base model: [bold]{choice.model}[/]\n(chosen because: {choice.reason})",
                                     title="tuneserve base model", border_style="green", expand=False))

    def _announce_key(self, settings: Settings, key: str, created: bool) -> None:
        where = settings.data_dir / API_KEY_FILE
        what = "created API key" if created else "API key"
        self.console.print(Panel(f"{what} for tenant [bold]{DEFAULT_TENANT}[/]:\n[bold]{key}[/]\n"
                                 f"saved in {where} (the CLI uses it by default)",
                                 title="API key", expand=False))
        # Outside the panel, on one line whatever the terminal's width, so it pastes as is.
        self.console.print("try it:", highlight=False)
        self.console.print(key_curl(settings, key), soft_wrap=True, highlight=False, markup=False)

    # -- processes -------------------------------------------------------------------------
    def _add(self, name: str, start: Callable[[], subprocess.Popen]) -> None:
        child = Child(name, start)
        self.children.append(child)
        self._start(child)

    def _start(self, child: Child) -> None:
        again = child.proc is not None
        child.restart_at = None
        child.proc = child.start()
        self._say(f"{'restarted' if again else 'started'} {child.name} (pid {child.proc.pid})")

    def _on_signal(self, signum, _frame) -> None:
        if not self._stopping:
            self.console.print(f"\n{signal.Signals(signum).name}: stopping tuneserve …")
        self._stopping = True

    def _supervise(self) -> int:
        """Until Ctrl-C / SIGTERM: restart whatever exits (it was not asked to), or give up."""
        while not self._stopping:
            for child in self.children:
                now = time.monotonic()
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._start(child)
                    continue
                code = child.proc.poll()
                if code is not None and not self._schedule_restart(child, code, now):
                    return 1
            time.sleep(0.2)
        return 0

    def _schedule_restart(self, child: Child, code: int, now: float) -> bool:
        """Record the crash; False when it is one too many for the policy's window."""
        p = self.policy
        while child.crashes and now - child.crashes[0] > p.window_s:
            child.crashes.popleft()
        child.crashes.append(now)
        n = len(child.crashes)
        if n > p.max_restarts:
            self._say(f"[bold red]{child.name} exited with code {code}: {n} crashes in {p.window_s:g} s, more "
                      f"than the {p.max_restarts} restarts allowed; giving up, stopping tuneserve[/]")
            return False
        delay = p.delay(n)
        self._say(f"[yellow]{child.name} exited with code {code}; restarting in {delay:.1f} s "
                  f"(restart {n} of {p.max_restarts} in {p.window_s:g} s)[/]")
        child.restart_at = now + delay
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM API, worker, then Redis (reverse start order), each as a whole process group;
        SIGKILL what is still up after `timeout`. Celery's warm shutdown waits for the running
        task; killing it is safe since the task is acks_late (redelivered) and the job resumes
        from its last checkpoint."""
        for child in reversed(self.children):
            proc = child.proc
            if proc is None:
                continue
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._say(f"{child.name} did not stop in {timeout:.0f}s; killing it")
                    proc.kill()
                    proc.wait()
            _signal_group(proc, signal.SIGKILL)  # anything it started and left behind
        self.children.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own session, so its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass
