"""The production stack's files: the compose file as Docker Compose v2 itself resolves it (no engine runs here:
images are not built and nothing is started), no committed secret, the image's install files, the Airflow plugin.
Where a setting can be exercised without an engine it is: the MLflow server is started with the compose file's
allowed hosts, the auth manager reads the password file airflow-init writes, the image's torch constraint is
checked against the CPU and CUDA wheel versions."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .stack import BIN, Server, free_port

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION = ROOT / "configs" / "production.yaml"
SERVICES = {"postgres", "redis", "minio", "minio-init", "mlflow", "mangaassist-serving", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
            "airflow-worker-gpu", "airflow-init"}
TEST_TOOLS = {"pytest", "pytest-timeout", "moto", "ruff", "aiosmtpd"}
STATE_DIR = "/var/lib/qat-pipeline"


def test_compose_file_parses_and_has_the_stack():
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    assert SERVICES <= set(services)
    gpu = services["airflow-worker-gpu"]
    assert "--queues gpu" in gpu["command"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_no_secret_is_committed():
    text = (ROOT / "docker-compose.yaml").read_text()
    assert "PASSWORD: ${" in text and "password:" not in text.lower().replace("_password:", "")
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for key, value in example.items():
        if any(s in key for s in ("PASSWORD", "SECRET", "FERNET", "TOKEN")):
            assert value == "", key
    assert set(SECRETS) <= set(example)  # every secret the stack requires is listed for the operator
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_plugin_loads():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mangaassist_plugin", ROOT / "plugins" / "mangaassist_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.MangaAssistPlugin.name == "mangaassist"
    assert mod.mlflow_run_url("3", "abc").endswith("/#/experiments/3/runs/abc")


SECRETS = {"POSTGRES_PASSWORD": "pg-test", "MLFLOW_DB_PASSWORD": "mlflow-test", "MINIO_ROOT_PASSWORD": "minio-test",
           "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-test", "AIRFLOW__API__SECRET_KEY": "api-key-test",
           "AIRFLOW__CORE__FERNET_KEY": "fernet-test", "AIRFLOW_ADMIN_PASSWORD": "admin-test",
           "QAT_SERVING_ADMIN_TOKEN": "serving-token-test",
           "AIRFLOW_CONN_MANGAASSIST_SMTP": '{"conn_type": "smtp", "host": "smtp.test", "port": 25}',
           "AIRFLOW_CONN_MANGAASSIST_SLACK": '{"conn_type": "http", "host": "https://hooks.slack.test/services/T/B/x"}'}


def compose_config(tmp_path, env: dict) -> subprocess.CompletedProcess:
    """The real `docker compose config` (Compose v2, installed into the venv by scripts/install_compose.sh), with
    `env` as the only .env and nothing of this process's environment but PATH and HOME (the test session's own
    QAT_CONFIG must not leak into the rendering)."""
    plugins = Path(sys.prefix) / "docker"
    if shutil.which("docker") is None or not (plugins / "cli-plugins" / "docker-compose").exists():
        pytest.fail("docker compose is not installed: run scripts/install_compose.sh .venv (scripts/test.sh does)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(["docker", "compose", "--project-directory", str(ROOT), "--env-file", str(env_file),
                           "-f", str(ROOT / "docker-compose.yaml"), "config", "--format", "json"],
                          env={**base, "DOCKER_CONFIG": str(plugins)}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """The services as `docker compose config` renders them with every secret filled in."""
    out = compose_config(tmp_path_factory.mktemp("compose"), SECRETS)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["services"]


def airflow_services(services: dict) -> dict:
    return {name: svc for name, svc in services.items() if name.startswith("airflow-")}


def mounts(svc: dict) -> dict:
    """Mount target -> source (a named volume's name, or a bind mount's host path)."""
    return {v["target"]: v["source"] for v in svc.get("volumes", [])}


def init_script(services: dict) -> list[str]:
    init = services["airflow-init"]
    assert init["entrypoint"] == ["/bin/bash"] and init["command"][0] == "-c"
    return [line.strip() for line in init["command"][1].splitlines() if line.strip()]


def entrypoint_at(lines: list[str]) -> int:
    """The one line of airflow-init that runs the image's entrypoint: it migrates the database, then runs the
    airflow command it is given. As root, Airflow is importable only through it (the airflow user's packages)."""
    [at] = [i for i, line in enumerate(lines) if line.startswith("/entrypoint airflow ")]
    assert not [line for line in lines if line.startswith("airflow ")]
    return at


def allowed_hosts(services: dict) -> str:
    command = services["mlflow"]["command"]
    return command[command.index("--allowed-hosts") + 1]


def test_docker_compose_config_resolves_the_stack(rendered):
    services = rendered
    assert SERVICES == set(services)
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
    # the pool configs/production.yaml names, one slot, created by airflow-init through the image's entrypoint
    pool = yaml.safe_load(PRODUCTION.read_text())["scheduling"]["llm_pool"]
    lines = init_script(services)
    assert lines[entrypoint_at(lines)].startswith(f"/entrypoint airflow pools set {pool} 1 ")
    for name, svc in services.items():  # every long-running service reports its health
        if name not in ("minio-init", "airflow-init"):
            assert "healthcheck" in svc, name


def test_docker_compose_refuses_to_start_without_a_secret(tmp_path):
    for missing in SECRETS:
        out = compose_config(tmp_path, {k: v for k, v in SECRETS.items() if k != missing})
        assert out.returncode != 0 and f"required variable {missing} is missing a value" in out.stderr, missing


def test_the_fernet_key_is_required(tmp_path):
    """No empty default: connections and variables would be stored unencrypted, or each component would make up
    a key of its own and fail to read the others'."""
    out = compose_config(tmp_path, {k: v for k, v in SECRETS.items() if k != "AIRFLOW__CORE__FERNET_KEY"})
    assert out.returncode != 0
    assert "required variable AIRFLOW__CORE__FERNET_KEY is missing a value: set AIRFLOW__CORE__FERNET_KEY in .env" \
        in out.stderr
    out = compose_config(tmp_path, {**SECRETS, "AIRFLOW__CORE__FERNET_KEY": ""})  # present but empty: refused too
    assert out.returncode != 0 and "AIRFLOW__CORE__FERNET_KEY" in out.stderr


def test_every_airflow_component_shares_the_keys_and_the_auth_manager(rendered):
    shared = {"AIRFLOW__CORE__FERNET_KEY": "fernet-test", "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-test",
              "AIRFLOW__API__SECRET_KEY": "api-key-test",
              "AIRFLOW__CORE__AUTH_MANAGER":
                  "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
              "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin"}
    components = airflow_services(rendered)
    assert set(components) == {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                               "airflow-triggerer", "airflow-worker", "airflow-worker-gpu", "airflow-init"}
    files = set()
    for name, svc in components.items():
        env = svc["environment"]
        assert {k: env.get(k) for k in shared} == shared, name
        files.add(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert len(files) == 1
    # the FAB auth manager's provider is not installed: nothing may name it
    assert "providers.fab" not in json.dumps(rendered)
    # the password file is on a volume the API server reads and airflow-init writes, and no other service mounts
    folder = str(Path(files.pop()).parent)
    holders = {name for name, svc in rendered.items() if folder in mounts(svc)}
    assert holders == {"airflow-apiserver", "airflow-init"}
    assert mounts(rendered["airflow-apiserver"])[folder] == mounts(rendered["airflow-init"])[folder]


def test_the_password_file_airflow_init_writes_logs_the_admin_in(rendered, tmp_path):
    """The line of airflow-init that writes the password file, run as it is, then Airflow's SimpleAuthManager
    (this venv's Airflow 3.3) configured as the compose file configures it: the admin's password from .env gets
    a token, a wrong one does not, and the manager generates no password of its own."""
    lines = init_script(rendered)
    writer = next(line for line in lines if line.startswith("python -c "))
    code = shlex.split(writer)[2]
    init_env = rendered["airflow-init"]["environment"]
    passwords = tmp_path / "auth" / "passwords.json"
    passwords.parent.mkdir()
    env = {"PATH": os.environ["PATH"], "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
           "AIRFLOW_ADMIN_USERNAME": init_env["AIRFLOW_ADMIN_USERNAME"],
           "AIRFLOW_ADMIN_PASSWORD": init_env["AIRFLOW_ADMIN_PASSWORD"]}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert json.loads(passwords.read_text()) == {"admin": "admin-test"}

    api_env = rendered["airflow-apiserver"]["environment"]
    check = """
import json
from fastapi.testclient import TestClient
from airflow.api_fastapi.app import create_auth_manager
manager = create_auth_manager()
manager.init()
client = TestClient(manager.get_fastapi_app())
codes = [client.post("/token", json={"username": "admin", "password": p}).status_code for p in ("admin-test", "wrong")]
print(json.dumps({"manager": type(manager).__name__, "codes": codes, "passwords": manager.get_passwords()}))
"""
    env = {"PATH": os.environ["PATH"], "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           **{k: api_env[k] for k in ("AIRFLOW__CORE__AUTH_MANAGER", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
                                      "AIRFLOW__API_AUTH__JWT_SECRET")},
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords)}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", check], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"manager": "SimpleAuthManager", "codes": [201, 401], "passwords": {"admin": "admin-test"}}
    # then the file is handed to the Airflow user, private, before the database is migrated
    file = api_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    at = lines.index(writer)
    assert lines[at + 1:at + 3] == [f"chown 50000:0 {file}", f"chmod 600 {file}"]
    assert entrypoint_at(lines) > at + 2


def test_the_state_folder_belongs_to_the_airflow_user(rendered):
    """Tasks run as uid 50000: the image creates state_dir owned by airflow (a fresh named volume takes that
    ownership) and airflow-init, as root, chowns the volume for one created before, ahead of everything else."""
    state_dir = yaml.safe_load(PRODUCTION.read_text())["state_dir"]
    assert state_dir == STATE_DIR
    for name, svc in airflow_services(rendered).items():
        assert mounts(svc).get(state_dir) == "qat-state", name
        if name != "airflow-init":
            assert svc["user"] == "50000:0", name
    assert rendered["airflow-init"]["user"] == "0:0"
    lines = init_script(rendered)
    chown = next(i for i, line in enumerate(lines) if line.startswith("chown -R "))
    assert "50000:0" in lines[chown].split() and state_dir in lines[chown].split()
    assert chown < entrypoint_at(lines)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"install -d -o airflow -g root -m 0775 {re.escape(state_dir)}\b", dockerfile)
    # made as root, before the image switches back to the Airflow user
    assert dockerfile.index("USER root") < dockerfile.index(state_dir) < dockerfile.index("USER airflow")


def test_mlflow_allows_the_host_the_workers_send(rendered):
    from mlflow.server.security_utils import HEALTH_ENDPOINTS, is_allowed_host_header

    mlflow = rendered["mlflow"]
    assert mlflow["entrypoint"] == ["/usr/bin/dumb-init", "--"]  # not Airflow's entrypoint
    hosts = allowed_hosts(rendered).split(",")
    assert {"mlflow", "mlflow:5000", "localhost:5000", "127.0.0.1:5000"} <= set(hosts)
    sent = {urlsplit(yaml.safe_load(PRODUCTION.read_text())["tracking"]["uri"]).netloc,
            urlsplit(rendered["mangaassist-serving"]["environment"]["MLFLOW_TRACKING_URI"]).netloc}
    for svc in airflow_services(rendered).values():
        sent.add(urlsplit(svc["environment"]["MLFLOW_TRACKING_URI"]).netloc)
        sent.add(urlsplit(svc["environment"]["MLFLOW_UI_URL"]).netloc)  # what a browser on the Docker host sends
    assert sent == {"mlflow:5000", "localhost:5000"}
    assert all(is_allowed_host_header(hosts, h) for h in sent)
    # the healthcheck asks an endpoint the Host check covers, with the Host header the workers send
    test = mlflow["healthcheck"]["test"]
    assert test[:3] == ["CMD", "curl", "--fail"]
    assert test[test.index("-H") + 1] == "Host: mlflow:5000"
    url = urlsplit(test[-1])
    assert url.netloc == "localhost:5000" and url.path.startswith("/api/") and url.path not in HEALTH_ENDPOINTS


def _get(url: str, host: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Host": host}), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.slow
@pytest.mark.stack
def test_a_real_mlflow_server_answers_the_workers_host_with_the_compose_allowed_hosts(rendered, tmp_path):
    """MLflow 3.17 started as the compose file starts it (its --allowed-hosts value, parsed from the rendered
    command) on loopback with a SQLite store: `Host: mlflow:5000` gets 200 and the compose healthcheck passes;
    the same server without the flag answers that Host with 403 while its /health still says 200."""
    env = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    health = rendered["mlflow"]["healthcheck"]["test"][1:]
    servers = []
    try:
        for name, extra in (("without", []), ("with", ["--allowed-hosts", allowed_hosts(rendered)])):
            port = free_port()
            cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{tmp_path / name}.db",
                   "--artifacts-destination", str(tmp_path / f"{name}-artifacts"), *extra]
            servers.append(Server(f"mlflow-{name}", cmd, f"http://127.0.0.1:{port}", "/health", env,
                                  tmp_path / f"{name}.log", timeout=180))
        bare, allowed = servers
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(bare.url + api, "mlflow:5000") == 403
        assert _get(bare.url + "/health", "mlflow:5000") == 200  # why the healthcheck cannot ask /health
        assert _get(allowed.url + api, "mlflow:5000") == 200
        assert _get(allowed.url + api, "mlflow") == 200
        assert _get(allowed.url + api, "evil.example:5000") == 403
        for server, rc in ((allowed, 0), (bare, 22)):  # curl --fail exits 22 on an HTTP error
            cmd = [a.replace("http://localhost:5000", server.url) for a in health]
            assert subprocess.run(cmd, capture_output=True, timeout=30).returncode == rc, server.name
    finally:
        for server in servers:
            server.stop()


def test_the_celery_workers_healthcheck_names_the_providers_app(rendered):
    import importlib.util

    app = "airflow.providers.celery.executors.celery_executor.app"
    for name in ("airflow-worker", "airflow-worker-gpu"):
        test = rendered[name]["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        assert re.findall(r"celery --app (\S+) inspect ping", test[1]) == [app], name
        assert "airflow.executors.celery_executor" not in test[1] and "||" not in test[1], name
    assert importlib.util.find_spec(app.rsplit(".", 1)[0]) is not None


def test_the_celery_executor_and_the_workers_app_import():
    """What the scheduler and the workers' healthcheck load: the executor the name CeleryExecutor resolves to,
    and the provider's Celery app, in this venv's pinned stack."""
    code = ("from airflow.executors.executor_loader import ExecutorLoader\n"
            "cls, _ = ExecutorLoader.import_executor_cls(ExecutorLoader.get_default_executor_name())\n"
            "from airflow.providers.celery.executors.celery_executor import app\n"
            "print(cls.__module__, cls.__name__, app.main)\n")
    env = {**os.environ, "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
           "AIRFLOW__CELERY__BROKER_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1].split()  # Airflow may log to stdout before it
    assert last[:2] == ["airflow.providers.celery.executors.celery_executor", "CeleryExecutor"], out.stdout


def test_the_serving_service(rendered):
    from qat_tasks.core.config import load_config

    serving, worker = rendered["mangaassist-serving"], rendered["airflow-worker"]
    assert serving["command"] == ["python", "-m", "qat_tasks.serving", "--host", "0.0.0.0", "--port", "8000"]
    assert serving["entrypoint"] == ["/usr/bin/dumb-init", "--"]  # not Airflow's entrypoint
    assert serving["image"] == worker["image"]
    env = serving["environment"]
    assert env["QAT_SERVING_ADMIN_TOKEN"] == "serving-token-test"
    for key in ("QAT_CONFIG", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert env[key] == worker["environment"][key], key
    # the config it names is this repository's production profile, mounted where QAT_CONFIG points
    config = Path(env["QAT_CONFIG"])
    folder = mounts(serving)[str(config.parent)]
    assert Path(folder) == ROOT / "configs" and (Path(folder) / config.name) == PRODUCTION
    assert [p for p in serving["ports"] if p["target"] == 8000] == [
        {"mode": "ingress", "target": 8000, "published": "8000", "protocol": "tcp"}]
    assert serving["healthcheck"]["test"] == ["CMD", "curl", "--fail", "http://localhost:8000/health"]
    assert serving["depends_on"]["mlflow"]["condition"] == "service_healthy"
    # its logs: serving.log_dir is null in the profile, so traffic.source on S3, in a bucket minio-init creates;
    # the aliases are polled every serving.reload_interval_s
    cfg = load_config(PRODUCTION)
    assert cfg.serving.log_dir is None and cfg.serving_log_dir == cfg.traffic_source
    bucket = urlsplit(cfg.serving_log_dir)
    assert bucket.scheme == "s3" and bucket.netloc in " ".join(rendered["minio-init"]["entrypoint"])
    assert cfg.serving.reload_interval_s > 0


def test_the_image_installs_the_runtime_pins_only_and_checks_them():
    dockerfile = (ROOT / "Dockerfile").read_text()
    steps = [step for step in re.split(r"(?<!\\)\n", dockerfile) if step.startswith("RUN ")]
    installs = [(i, " ".join(part.replace("\\\n", " ").split())) for i, step in enumerate(steps)
                for part in step.split("&&") if "pip install" in part]
    # torch first and alone, from the wheel index the build argument names
    assert installs[0][1].endswith('pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"')
    files = re.findall(r"pip install[^&]* -r (\S+)", dockerfile)
    assert files == ["requirements.txt"]
    last_install = max(i for i, _ in installs)
    assert "pip check" in steps[last_install].split("&&")[-1]  # after the project itself is installed
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "requirements-dev.txt" not in instructions  # neither copied nor installed
    assert "requirements-dev.txt" in (ROOT / ".dockerignore").read_text().split()

    def pins(path: Path) -> tuple[dict, list[str]]:
        found, includes = {}, []
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("-r "):
                includes.append(line[3:].strip())
            elif line:
                req = Requirement(line)
                found[canonicalize_name(req.name)] = req
        return found, includes

    runtime, runtime_includes = pins(ROOT / "requirements.txt")
    dev, dev_includes = pins(ROOT / "requirements-dev.txt")
    assert runtime_includes == [] and not TEST_TOOLS & set(runtime)
    assert dev_includes == ["requirements.txt"] and set(dev) == TEST_TOOLS
    constraints = {canonicalize_name(Requirement(line).name): Requirement(line) for line in
                   (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")}
    for name, req in {**runtime, **dev}.items():  # every pin is the frozen version
        frozen = next(iter(constraints[name].specifier)).version
        assert req.specifier.contains(frozen), (name, str(req.specifier), frozen)
    env_sh = (ROOT / "scripts" / "_env.sh").read_text()
    assert "pip install -q -r requirements-dev.txt -c constraints.txt" in env_sh
    stamp = next(line for line in env_sh.splitlines() if line.startswith("WANT="))
    assert "requirements.txt" in stamp and "requirements-dev.txt" in stamp and "constraints.txt" in stamp


def test_the_image_torch_constraint_admits_the_cpu_and_the_cuda_wheel(tmp_path):
    """constraints.txt freezes the CPU wheel (2.13.0+cpu); the GPU worker's image installs 2.13.0+cu128 first.
    The Dockerfile's rewrite of the constraints, run here, must accept both and change nothing else."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    rewrite = re.search(r"(sed '[^']+' constraints\.txt) > (\S+)", dockerfile)
    assert rewrite and f"-c {rewrite.group(2)}" in dockerfile
    out = subprocess.run(["bash", "-c", rewrite.group(1)], cwd=ROOT, capture_output=True, text=True, check=True)
    before = (ROOT / "constraints.txt").read_text().splitlines()
    after = out.stdout.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert [a.split("==")[0] for a, _ in changed] == ["torch"]
    torch = Requirement(changed[0][1])
    assert all(torch.specifier.contains(v) for v in ("2.13.0", "2.13.0+cpu", "2.13.0+cu128"))
    assert not torch.specifier.contains("2.15.0")
    assert not Requirement(changed[0][0]).specifier.contains("2.13.0+cu128")  # why the rewrite is needed


def test_the_celery_result_backend_and_broker_use_installed_drivers(rendered):
    """The result backend's SQLAlchemy URL loads its driver in the image's stack (a bare postgresql:// would ask
    for psycopg 3, which is not installed, and every worker would fail at start), and Redis keeps a task's message
    unacknowledged longer than the longest task may run."""
    from sqlalchemy.engine import make_url

    from qat_tasks.core.config import load_config

    for name, svc in airflow_services(rendered).items():
        env = svc["environment"]
        url = make_url(env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"))
        assert url.get_dialect().driver == "psycopg2", name
        url.get_dialect().import_dbapi()
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://"), name
        longest = max(load_config(ROOT / "configs" / "production.yaml").scheduling.task_timeouts_minutes.values())
        assert int(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"]) > longest * 60, name


def test_the_notification_connections_are_the_ones_the_production_profile_names(rendered):
    """Every Airflow service has the SMTP and webhook connections that configs/production.yaml's
    `notifications` names, as AIRFLOW_CONN_<ID> variables taken from .env."""
    from qat_tasks.core.config import load_config

    settings = load_config(PRODUCTION).notifications
    wanted = {f"AIRFLOW_CONN_{c.upper()}": SECRETS[f"AIRFLOW_CONN_{c.upper()}"]
              for c in (settings.smtp_conn_id, settings.webhook_conn_id)}
    for name, svc in airflow_services(rendered).items():
        assert {k: svc["environment"].get(k) for k in wanted} == wanted, name
        assert json.loads(svc["environment"]["AIRFLOW_CONN_MANGAASSIST_SMTP"])["conn_type"] == "smtp"
