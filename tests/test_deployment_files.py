"""The production stack's files: the compose file as Docker Compose v2 itself resolves it (no engine runs here:
images are not built and nothing is started), no committed secret, the Airflow plugin."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_parses_and_has_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
            "airflow-init"} <= set(services)
    gpu = services["airflow-worker-gpu"]
    assert "--queues gpu" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_no_secret_is_committed():
    text = (ROOT / "docker-compose.yaml").read_text()
    assert "PASSWORD: ${" in text and "password:" not in text.lower().replace("_password:", "")
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for key, value in example.items():
        if any(s in key for s in ("PASSWORD", "SECRET", "FERNET")):
            assert value == "", key
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_plugin_loads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mangaassist_plugin", ROOT / "plugins" / "mangaassist_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.MangaAssistPlugin.name == "mangaassist"
    assert mod.mlflow_run_url("3", "abc").endswith("/#/experiments/3/runs/abc")


SECRETS = {"POSTGRES_PASSWORD": "pg-test", "MLFLOW_DB_PASSWORD": "mlflow-test", "MINIO_ROOT_PASSWORD": "minio-test",
           "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-test", "_AIRFLOW_WWW_USER_PASSWORD": "admin-test"}


def compose_config(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """The real `docker compose config` (Compose v2, installed into the venv by scripts/install_compose.sh)."""
    plugins = Path(sys.prefix) / "docker"
    if shutil.which("docker") is None or not (plugins / "cli-plugins" / "docker-compose").exists():
        pytest.fail("docker compose is not installed: run scripts/install_compose.sh .venv (scripts/test.sh does)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(["docker", "compose", "--project-directory", str(ROOT), "--env-file", str(env_file),
                           "-f", str(ROOT / "docker-compose.yaml"), "config", "--format", "json"],
                          env={**clean, "DOCKER_CONFIG": str(plugins)}, capture_output=True, text=True, timeout=60)


def test_docker_compose_config_resolves_the_stack(tmp_path):
    out = compose_config(tmp_path, SECRETS)
    assert out.returncode == 0, out.stderr
    services = json.loads(out.stdout)["services"]
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "airflow-worker", "airflow-worker-gpu",
            "airflow-init"} == set(services)
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == "postgresql+psycopg2://airflow:pg-test@postgres/airflow"
    gpu = services["airflow-worker-gpu"]
    assert gpu["command"][-4:] == ["--queues", "gpu", "--concurrency", "1"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
    assert "cu1" in gpu["build"]["args"]["TORCH_INDEX_URL"] and gpu["image"] != services["airflow-worker"]["image"]
    assert services["airflow-worker"]["command"][-2:] == ["--queues", "default"]
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql+psycopg2://mlflow:mlflow-test@postgres/mlflow" in mlflow
    assert "--artifacts-destination s3://mlflow-artifacts" in mlflow
    buckets = " ".join(services["minio-init"]["entrypoint"] + (services["minio-init"].get("command") or []))
    assert all(b in buckets for b in ("mangaassist-logs", "mangaassist-mlops", "mlflow-artifacts"))
    assert "llm_gpu" in " ".join(services["airflow-init"]["command"])  # the pool configs/production.yaml names
    for name, svc in services.items():  # every long-running service reports its health
        if name not in ("minio-init", "airflow-init"):
            assert "healthcheck" in svc, name


def test_docker_compose_refuses_to_start_without_a_secret(tmp_path):
    for missing in SECRETS:
        out = compose_config(tmp_path, {k: v for k, v in SECRETS.items() if k != missing})
        assert out.returncode != 0 and f"required variable {missing} is missing a value" in out.stderr, missing
