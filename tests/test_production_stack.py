"""The quarterly DAG against the production components, started for real here without Docker (tests/stack.py):
PostgreSQL (Airflow's metadata and the MLflow server's backend), moto's S3 server (traffic logs, calibration
store, MLflow's artifacts) and an MLflow tracking server. Airflow runs as the operator runs it, `airflow db
migrate`, and each DAG run in its own process through Airflow's dag.test() (tests/run_dag.py). Then: the same DAG run twice duplicates nothing; the
MLflow server stopped in the middle of a run, and S3 reads failing, end in a clear task failure, and the rerun
finishes without losing or duplicating anything.

A TCP proxy (tests/faults.py) between the pipeline and S3 breaks connections on demand; nothing is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, WINDOW, tiny_config_dict
from .faults import FaultyProxy
from .stack import BIN, Postgres, mlflow_server, moto_s3

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.stack]

DAG = "quarterly_recalibration"
LOGS, MLOPS, ARTIFACTS = "mangaassist-logs", "mangaassist-mlops", "mlflow-artifacts"
INTENT_ONLY = {"models": ["intent-classifier"]}


class Stack:
    def __init__(self, root: Path, compose_flags: bool = False):
        self.root, self.pg, self.s3, self.mlflow, self.proxy = root, None, None, None, None
        self.compose_flags = compose_flags  # the MLflow server started with docker-compose.yaml's flags
        try:
            self._start(root)
        except BaseException:
            self.close()  # no server left running behind a failed start
            raise

    def _start(self, root: Path) -> None:
        import boto3

        self.pg = Postgres(root / "postgres")
        self.airflow_db = self.pg.create_database("airflow", "airflow-test-pw")
        mlflow_db = self.pg.create_database("mlflow", "mlflow-test-pw")
        self.s3 = moto_s3(root / "moto.log")
        self.s3_client = boto3.client("s3", endpoint_url=self.s3.url)
        for bucket in (LOGS, MLOPS, ARTIFACTS):
            self.s3_client.create_bucket(Bucket=bucket)
        self.mlflow = mlflow_server(mlflow_db, f"s3://{ARTIFACTS}", self.s3.url, root / "mlflow.log",
                                    self.compose_flags)
        self.proxy = FaultyProxy(self.s3.url)  # the pipeline reaches S3 through it
        self.config = root / "stack.yaml"
        data = tiny_config_dict(f"s3://{LOGS}/inference")
        data["traffic"]["s3_endpoint_url"] = self.proxy.url
        data["calibration"]["output"] = f"s3://{MLOPS}/calibration"
        data["tracking"] = {"uri": self.mlflow.url, "experiment_prefix": "mangaassist"}
        data["state_dir"] = str(root / "state")
        # Fail fast in tests: three tries per request, short backoff; no Airflow-level task retries, so an
        # outage shows as one failed task (production: 5 tries, 2 task retries with exponential delay).
        data["retries"] = {"attempts": 3, "backoff_s": 1, "max_backoff_s": 2, "timeout_s": 30}
        data["scheduling"] = {**data.get("scheduling", {}), "task_retries": 0}
        self.config.write_text(yaml.safe_dump(data))
        from qat_tasks.synthetic.generator import generate

        generate(f"s3://{LOGS}/inference", *WINDOW, records_per_day=250, seed=11, corrupt_rate=0.005,
                 endpoint_url=self.s3.url)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_HTTP_", "AIRFLOW__"))}
        self.env.update({
            "AIRFLOW_HOME": str(root / "airflow"), "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.airflow_db,
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "QAT_CONFIG": str(self.config), "QAT_STATE_DIR": str(root / "state"),
            "MLFLOW_TRACKING_URI": self.mlflow.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(ROOT)})
        self.airflow("db", "migrate")

    def airflow(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        out = subprocess.run([str(BIN / "airflow"), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, cwd=self.root)
        (self.root / "airflow-commands.log").open("a").write(f"$ airflow {' '.join(args)}\n{out.stdout}\n"
                                                            f"{out.stderr}\n")
        if args[:2] == ("db", "migrate") and out.returncode:
            raise RuntimeError(f"airflow db migrate failed:\n{out.stderr[-3000:]}")
        return out

    def dags_test(self, logical_date: str, **conf) -> tuple[str, str]:
        """One run of the quarterly DAG (Airflow's dag.test() in its own process, run id fixed by the logical date,
        so calling it again reruns the same DAG run: tests/run_dag.py); returns (the run's state as Airflow's
        PostgreSQL has it, output)."""
        body = {"reason": "integration test against the production stack", "window_start": WINDOW[0].isoformat(),
                "window_end": WINDOW[1].isoformat(), **conf}
        out = subprocess.run([str(BIN / "python"), "-m", "tests.run_dag", DAG, logical_date, json.dumps(body)],
                             env=self.env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        text = out.stdout + out.stderr
        (self.root / "dag-runs.log").open("a").write(f"$ run_dag {logical_date} {json.dumps(body)}\n{text}\n")
        return self.run_state(logical_date), text

    def run_state(self, logical_date: str) -> str:
        return self.pg.sql(f"SELECT state FROM dag_run WHERE dag_id = '{DAG}' AND logical_date::date = "
                           f"'{logical_date}' ORDER BY id DESC LIMIT 1", db="airflow")

    def objects(self, bucket: str) -> dict[str, str]:
        pages = self.s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for p in pages for o in p.get("Contents", [])}

    def registry(self) -> dict[str, list[str]]:
        from mlflow import MlflowClient

        # Both URIs: a client's registry otherwise follows mlflow.get_registry_uri(), this session's SQLite store.
        client = MlflowClient(tracking_uri=self.mlflow.url, registry_uri=self.mlflow.url)
        return {m.name: sorted(str(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
                for m in client.search_registered_models()}

    def mlflow_rows(self, table: str) -> int:
        return int(self.pg.sql(f"SELECT count(*) FROM {table}", db="mlflow"))

    def close(self) -> None:
        for part in (self.proxy, self.mlflow, self.s3):
            if part is not None:
                part.close() if part is self.proxy else part.stop()
        if self.pg is not None:
            self.pg.stop()
            self.pg.remove()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint):  # s3_endpoint: the session's AWS test credentials in the environment
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def first_run(stack):
    started = time.monotonic()
    state, output = stack.dags_test("2026-07-16")
    return {"state": state, "output": output, "seconds": time.monotonic() - started}


def test_quarterly_dag_runs_on_postgres_s3_and_the_mlflow_server(stack, first_run):
    assert first_run["state"] == "success", first_run["output"][-5000:]
    # Airflow's metadata is in PostgreSQL: every task of the run succeeded (or was skipped by design).
    states = Counter(stack.pg.sql(f"SELECT state FROM task_instance WHERE dag_id = '{DAG}'", db="airflow").split())
    assert states["success"] >= 10 and not {"failed", "upstream_failed"} & set(states)
    # Models are registered on the server, whose backend is PostgreSQL and whose artifacts are in S3.
    registry = stack.registry()
    assert {"mangaassist-intent-classifier", "mangaassist-escalation-detector", "mangaassist-reranker",
            "mangaassist-fallback-llm"} <= set(registry)
    assert stack.mlflow_rows("model_versions") == sum(len(v) for v in registry.values())
    assert stack.mlflow_rows("runs") > 10
    artifacts = stack.objects(ARTIFACTS)
    assert any(k.endswith("model.onnx") for k in artifacts) and any(k.endswith(".png") for k in artifacts)
    assert not list((stack.root / "state").rglob("mlruns"))  # nothing fell back to a local store
    # The calibration data went to the S3 store, read from the S3 logs.
    calibration = stack.objects(MLOPS)
    assert any(k.startswith("calibration/") and k.endswith("manifest.json") for k in calibration)
    assert any(k.endswith("quarantine.jsonl.gz") for k in calibration)  # corrupt lines kept, not dropped


def test_the_same_dag_run_twice_duplicates_nothing(stack, first_run):
    before = (stack.registry(), stack.objects(ARTIFACTS), stack.objects(MLOPS), stack.mlflow_rows("runs"))
    state, output = stack.dags_test("2026-07-16")  # the same logical date: the same run id
    assert state == "success", output[-5000:]
    after = (stack.registry(), stack.objects(ARTIFACTS), stack.objects(MLOPS), stack.mlflow_rows("runs"))
    assert after[0] == before[0]  # no registry version added
    assert after[1] == before[1] and after[2] == before[2]  # no artifact or calibration object added or rewritten
    assert after[3] == before[3]  # every stage found its finished MLflow run


def _wait_for_task(stack, logical_date: str, task_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = (f"SELECT count(*) FROM task_instance ti JOIN dag_run dr ON dr.run_id = ti.run_id AND "
             f"dr.dag_id = ti.dag_id WHERE ti.dag_id = '{DAG}' AND dr.logical_date::date = '{logical_date}' AND "
             f"ti.task_id = '{task_id}' AND ti.state = 'success'")
    while time.monotonic() < deadline:
        if int(stack.pg.sql(query, db="airflow") or 0) > 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{task_id} of {logical_date} did not succeed within {timeout:.0f} s")


def test_mlflow_server_stopped_mid_run_fails_clearly_and_the_rerun_loses_nothing(stack, first_run):
    date = "2026-07-17"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(zip(("state", "output"),
                                                               stack.dags_test(date, **INTENT_ONLY), strict=True)))
    runner.start()
    _wait_for_task(stack, date, "ensure_champion", 600)
    stack.mlflow.stop()  # the tracking server goes away between stages
    runner.join(900)
    assert result["state"] == "failed"
    out = result["output"]
    assert "ServiceUnavailableError" in out and f"the MLflow server at {stack.mlflow.url} did not answer" in out
    finished = stack.pg.sql(f"SELECT task_id FROM task_instance ti JOIN dag_run dr USING (dag_id, run_id) WHERE "
                            f"dr.logical_date::date = '{date}' AND ti.state = 'success'", db="airflow").split()
    assert {"plan", "refresh_calibration", "ensure_champion"} <= set(finished)

    stack.mlflow.start()  # back (same PostgreSQL backend, same S3 artifacts)
    runs_before = stack.mlflow_rows("runs")
    registry_before = stack.registry()
    state, output = stack.dags_test(date, **INTENT_ONLY)
    assert state == "success", output[-5000:]
    # What finished before the outage was reused: no second calibration or champion run for this DAG run.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url, registry_uri=stack.mlflow.url)
    exps = [e.experiment_id for e in client.search_experiments()]
    mine = client.search_runs(exps, filter_string=f"tags.`airflow.run_id` LIKE '%{date}%'", max_results=1000)
    keys = Counter(r.data.tags.get("qat.run_key") for r in mine if r.data.tags.get("qat.run_key"))
    assert keys and max(keys.values()) == 1, keys  # one MLflow run per stage of this DAG run
    added = {n: sorted(set(v) - set(registry_before.get(n, []))) for n, v in stack.registry().items()}
    assert all(len(v) <= 1 for v in added.values()), added  # at most the one challenger of this run
    assert stack.mlflow_rows("runs") >= runs_before


def test_s3_reads_broken_mid_file_resume_and_a_lasting_outage_fails_clearly(stack, first_run):
    # A new window, so the refresh reads the log files again; three of those reads are cut 1.5 kB into the
    # response, in the middle of the file, and resume where they stopped.
    window = {"window_start": WINDOW[0].isoformat(), "window_end": "2026-07-14", **INTENT_ONLY}
    stack.proxy.set("cut_matching", match=f"GET /{LOGS}/".encode(), cut_after=1500, cuts=3)
    state, output = stack.dags_test("2026-07-18", **window)
    assert state == "success", output[-5000:]
    assert stack.proxy.broken == 3 and "resuming in" in output

    # S3 gone for good: the refresh fails naming S3, after its tries; then S3 is back and the rerun finishes.
    window = {"window_start": WINDOW[0].isoformat(), "window_end": "2026-07-13", **INTENT_ONLY}
    stack.proxy.set("reset")
    state, output = stack.dags_test("2026-07-19", **window)
    assert state == "failed"
    assert "ServiceUnavailableError" in output and f"S3 at {stack.proxy.url} did not answer after 3 tries" in output
    stack.proxy.set("pass")
    state, output = stack.dags_test("2026-07-19", **window)
    assert state == "success", output[-5000:]
