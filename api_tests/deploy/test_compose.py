"""docker-compose.yml / Dockerfile: checked as YAML always, and through a real Compose
implementation (`docker compose config` or `docker-compose config`) when one is installed.
`config` needs no Docker engine; without a Compose client those tests skip."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.core.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever answers."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            ok = subprocess.run([*cmd, "version"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
        if ok:
            return cmd
    return None


def run_config(cmd: list[str], env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNESERVE_", "POSTGRES_", "COMPOSE_"))}
    env.update(env_extra)
    return subprocess.run([*cmd, "-f", str(COMPOSE_FILE), *args, "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def _gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def _check_services(services: dict) -> None:
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    # GPU reservations: the worker trains, the API's engine serves the 4-bit base.
    for name in ("worker", "api"):
        [dev] = _gpu_devices(services[name])
        assert dev["driver"] == "nvidia" and int(dev["count"]) == 1 and dev["capabilities"] == ["gpu"], name
    # Healthchecks.
    assert "redis-cli" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    # Start order waits for healthy dependencies.
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"]["condition"] == "service_healthy"
        assert deps["postgres"]["condition"] == "service_healthy"
    # Persistent volumes: the database, the registry and data (shared by API and worker).
    assert any(str(v).endswith("/var/lib/postgresql/data") or "/var/lib/postgresql/data" in str(v)
               for v in services["postgres"]["volumes"])
    for name in ("api", "worker"):
        mounts = " ".join(str(v) for v in services[name]["volumes"])
        assert "/registry" in mounts and "/data" in mounts, name
        env = services[name]["environment"]
        assert env["TUNESERVE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["TUNESERVE_REDIS_URL"].startswith("redis://redis:")
    assert "worker" in services["worker"]["command"]


def test_compose_file_structure():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    _check_services(services)
    assert services["flower"]["profiles"] == ["monitoring"]
    assert "TUNESERVE_API_KEYS" in services["api"]["environment"]


def test_compose_settings_are_real_settings(monkeypatch):
    """Settings ignores unknown TUNESERVE_* names, so a typo here would be silent: every name
    must be a field, and each service's environment must build valid Settings."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    fields = set(Settings.model_fields)
    for name in ("api", "worker"):
        env = dict(services[name]["environment"])
        for key in env:
            if key.startswith("TUNESERVE_"):
                assert key.removeprefix("TUNESERVE_").lower() in fields, f"{name}: {key} is not a setting"
        for key in list(os.environ):
            if key.startswith("TUNESERVE_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            # Compose's ${VAR:-default} / ${VAR:?msg}: use the default, or a stand-in key.
            if isinstance(value, str) and value.startswith("${") and ":?" in value:
                value = "k1:default"
            elif isinstance(value, str) and ":-" in value:
                head, _, rest = value.partition("${")
                var_default, _, tail = rest.partition("}")
                value = head + var_default.split(":-", 1)[1] + tail
            monkeypatch.setenv(key, str(value))
        if name == "api":
            monkeypatch.setenv("TUNESERVE_HOST", "0.0.0.0")  # what `--host 0.0.0.0` sets
        settings = Settings()
        assert settings.resolved_registry_dir == Path("/registry")


def test_dockerfile_builds_the_cuda_image():
    text = (REPO / "Dockerfile").read_text()
    froms = [line for line in text.splitlines() if line.startswith("FROM ")]
    assert froms and froms[0].startswith("FROM nvidia/cuda:")
    assert "download.pytorch.org/whl/cu" in text  # the CUDA build of torch, before the project
    assert "pip install" in text and "USER tuneserve" in text
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and ".tuneserve" in ignored


@pytest.fixture(scope="module")
def compose():
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no Docker Compose client (docker compose / docker-compose) installed")
    return cmd


def test_compose_config_validates(compose):
    res = run_config(compose, {"TUNESERVE_API_KEYS": "k1:default"}, "--profile", "monitoring")
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    _check_services(services)
    assert "flower" in services
    assert services["api"]["environment"]["TUNESERVE_API_KEYS"] == "k1:default"
    assert services["api"]["environment"]["TUNESERVE_BASE_MODEL"] == "THUDM/chatglm3-6b"


def test_compose_base_model_and_password_come_from_the_environment(compose):
    res = run_config(compose, {"TUNESERVE_API_KEYS": "k1:default", "TUNESERVE_BASE_MODEL": "/models/glm",
                               "POSTGRES_PASSWORD": "s3cret"})
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    assert services["worker"]["environment"]["TUNESERVE_BASE_MODEL"] == "/models/glm"
    assert ":s3cret@postgres:" in services["worker"]["environment"]["TUNESERVE_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"


def test_compose_refuses_to_run_without_api_keys(compose):
    res = run_config(compose, {})
    assert res.returncode != 0
    assert "TUNESERVE_API_KEYS" in res.stderr + res.stdout
