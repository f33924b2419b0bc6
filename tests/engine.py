"""Airflow's distributed engine as processes on loopback, configured as docker-compose.yaml configures it: Redis
(the Celery broker), the api-server (REST API and the execution API the workers report to), scheduler,
dag-processor, triggerer, and two Celery workers, one on queue `default` and one on queue `gpu` (concurrency 1,
the LLM's pool `llm_gpu` of one slot). Metadata in PostgreSQL (tests/stack.py). Each process logs to a file of its
own; a worker can be killed with its whole process tree and started again."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .stack import BIN, _tail, free_port

USER, PASSWORD = "admin", "engine-test-admin-pw"


def worker_hostname() -> str:
    """[core] hostname_callable of the test's workers: both run on this machine, so each reports the name it was
    started with (production workers are separate hosts and report their own)."""
    import socket

    return os.environ.get("QAT_WORKER_HOSTNAME") or socket.getfqdn()


class Process:
    """One long-running process from this venv; `ready` is polled until it says the process is up."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, ready, timeout: float = 180):
        self.name, self.cmd, self.env, self.log, self.ready, self.timeout = name, cmd, env, log, ready, timeout
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}\n{_tail(self.log)}")
            if self.ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} was not ready within {self.timeout:.0f} s\n{_tail(self.log)}")

    def kill(self) -> None:
        """SIGKILL to the process and everything it started (its session): a machine lost mid-task."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()


def _log_has(log: Path, text: str):
    return lambda: log.exists() and text in log.read_text(errors="replace")


def _http_ok(url: str):
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except Exception:
            return False
    return check


class Engine:
    def __init__(self, root: Path, env: dict, sql_uri: str, pg):
        self.root, self.pg, self.procs = root, pg, {}
        root.mkdir(parents=True, exist_ok=True)
        self.redis_port, self.api_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        (root / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
        from cryptography.fernet import Fernet

        self.env = {
            **env,
            "AIRFLOW_HOME": str(root / "airflow"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sql_uri,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sql_uri,  # postgresql+psycopg2: the driver installed
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(root / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            # Only the runs the test asks for: no scheduled quarter or drift check of its own.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # A killed worker's task is noticed in 20 s instead of 5 minutes.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def airflow(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.root)
        (self.root / "airflow-commands.log").open("a").write(f"$ airflow {' '.join(args)}\n{out.stdout}{out.stderr}\n")
        if out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{out.stderr[-3000:]}")
        return out.stdout

    def _start(self) -> None:
        redis = shutil.which("redis-server")
        if redis is None:
            raise RuntimeError("redis-server is not installed: scripts/test.sh installs Debian's redis-server")
        log = self.root / "redis.log"
        self.procs["redis"] = Process("redis", [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1",
                                                "--save", "", "--appendonly", "no", "--dir", str(self.root)],
                                      self.env, log, _log_has(log, "Ready to accept connections"), 30)
        self.airflow("db", "migrate", timeout=600)
        self.airflow("pools", "set", "llm_gpu", "1", "4-bit LLM quantization: one at a time on the GPU")
        air = str(BIN / "airflow")
        self._add("api-server", [air, "api-server", "--host", "127.0.0.1", "--port", str(self.api_port),
                                 "--workers", "1"], _http_ok(f"{self.api}/api/v2/monitor/health"))
        port = self.env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"]
        self._add("scheduler", [air, "scheduler"], _http_ok(f"http://127.0.0.1:{port}/health"))
        self._add("dag-processor", [air, "dag-processor"], self._job_running("DagProcessorJob"))
        self._add("triggerer", [air, "triggerer"], self._job_running("TriggererJob"))
        self.start_worker("default", "default", 2)
        self.start_worker("gpu", "gpu", 1)

    def _add(self, name: str, cmd: list[str], ready, env: dict | None = None) -> Process:
        self.procs[name] = Process(name, cmd, {**self.env, **(env or {})}, self.root / f"{name}.log", ready)
        return self.procs[name]

    def _job_running(self, job_type: str):
        return lambda: int(self.pg.sql(f"SELECT count(*) FROM job WHERE job_type = '{job_type}' AND "
                                       f"state = 'running'", db="airflow") or 0) > 0

    def worker_name(self, name: str) -> str:
        return f"worker-{name}.engine-test"

    def start_worker(self, name: str, queue: str, concurrency: int) -> Process:
        """A Celery worker on `queue`; its tasks report the host name worker-<name>.engine-test."""
        log = self.root / f"worker-{name}.log"
        mark = f"celery@{self.worker_name(name)} ready"
        offset = log.stat().st_size if log.exists() else 0
        cmd = [str(BIN / "airflow"), "celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
               "--celery-hostname", self.worker_name(name), "--without-gossip", "--without-mingle"]
        env = {"QAT_WORKER_HOSTNAME": self.worker_name(name),
               "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.engine.worker_hostname",
               "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port())}

        def ready() -> bool:
            return log.exists() and mark in log.read_text(errors="replace")[offset:]

        self.procs[f"worker-{name}"] = Process(f"worker-{name}", cmd, {**self.env, **env}, log, ready)
        return self.procs[f"worker-{name}"]

    # The REST API, as an operator or another system uses it: a token from the auth manager, then /api/v2.
    def token(self) -> str:
        body = json.dumps({"username": USER, "password": PASSWORD}).encode()
        req = urllib.request.Request(f"{self.api}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())["access_token"]

    def rest(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> dict:
        req = urllib.request.Request(f"{self.api}/api/v2{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token()}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: {exc.code} {exc.read().decode(errors='replace')}") from exc

    def wait_for_dag(self, dag_id: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.rest("GET", f"/dags/{dag_id}")
                return
            except RuntimeError:
                time.sleep(2)
        raise TimeoutError(f"the dag-processor did not parse {dag_id} within {timeout:.0f} s\n"
                           f"{_tail(self.root / 'dag-processor.log')}")

    def trigger(self, dag_id: str, conf: dict, run_id: str | None = None) -> str:
        body = {"logical_date": None, "conf": conf, **({"dag_run_id": run_id} if run_id else {})}
        return self.rest("POST", f"/dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 3) -> str:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            try:
                state = self.rest("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            except RuntimeError:
                state = "absent"
            if state in ("success", "failed"):
                return state
            time.sleep(poll)
        raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout:.0f} s\n"
                           f"{_tail(self.root / 'scheduler.log')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        rows = self.pg.sql("SELECT task_id, map_index, hostname, queue, pool, state, try_number, "
                           "coalesce(rendered_map_index, '') FROM task_instance WHERE dag_id = "
                           f"'{dag_id}' AND run_id = '{run_id}' ORDER BY start_date NULLS LAST, task_id, map_index",
                           db="airflow")
        keys = ("task_id", "map_index", "hostname", "queue", "pool", "state", "try_number", "label")
        return [dict(zip(keys, line.split("|"), strict=True)) for line in rows.splitlines() if line]

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            try:
                proc.stop()
            except Exception:
                proc.kill()
