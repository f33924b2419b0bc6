"""The DAGs on Airflow's distributed engine, every component a process on loopback (tests/engine.py): PostgreSQL,
Redis, moto's S3 server, the MLflow server with docker-compose.yaml's flags, the api-server, scheduler,
dag-processor, triggerer and two Celery workers (queue `default`; queue `gpu`, concurrency 1, pool `llm_gpu`).

The quarterly run is triggered through the REST API with a reason and runs to success: the LLM's task on the
`gpu` worker inside its pool, XComs holding ids and URIs only, models registered on the MLflow server with their
artifacts in S3, a deadline alert e-mailed from the triggerer when the run outlasts its expected duration. Then
the drift monitor, triggered the same way on a day of drifted traffic, makes the scheduler start a recalibration;
its worker is killed with SIGKILL in the middle of a task, the scheduler notices the lost heartbeat and retries the
task on the restarted worker, and the run finishes with nothing duplicated. Notifications go to a real SMTP
server (aiosmtpd) in this process."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import date

import pytest
import yaml

from .conftest import WINDOW
from .engine import Engine
from .stack import Inbox
from .test_production_stack import ARTIFACTS, LOGS, MLOPS, Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.stack, pytest.mark.timeout(1800)]

DAG, DRIFT_DAG = "quarterly_recalibration", "drift_monitor"
DRIFT_DAY = WINDOW[1]  # the day after the calibrated window: a catalogue launch
REASON = "engine test: the quarterly recalibration on the distributed engine"


@pytest.fixture(scope="module")
def engine(tmp_path_factory, s3_endpoint):
    root = tmp_path_factory.mktemp("engine")
    stack = Stack(root, compose_flags=True)
    inbox = Inbox()
    eng = None
    try:
        data = yaml.safe_load(stack.config.read_text())
        data["scheduling"] = {**data.get("scheduling", {}), "llm_queue": "gpu", "llm_pool": "llm_gpu",
                              "task_retries": 1, "retry_delay_s": 2.0, "max_retry_delay_s": 5.0,
                              "task_timeout_minutes": 20.0, "expected_run_minutes": 1.0}
        data["notifications"] = {"smtp_conn_id": "qat_smtp", "email_to": ["mlops-oncall@example.com"]}
        data["drift"] = {**data.get("drift", {}), "models": ["intent-classifier"], "min_rows": 100}
        # The drift monitor reads what the serving component logged: here the same S3 logs the refresh reads.
        data["serving"] = {**data.get("serving", {}), "log_dir": f"s3://{LOGS}/inference"}
        stack.config.write_text(yaml.safe_dump(data))
        from qat_tasks.synthetic.generator import generate

        generate(f"s3://{LOGS}/inference", DRIFT_DAY, date.fromordinal(DRIFT_DAY.toordinal() + 1),
                 records_per_day=320, seed=29, drift="catalogue_launch", endpoint_url=stack.s3.url)
        env = {**stack.env, "AIRFLOW_CONN_QAT_SMTP": json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": inbox.port,
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "airflow@engine-test"}})}
        eng = Engine(root / "engine", env, stack.airflow_db, stack.pg)
        eng.wait_for_dag(DAG)
        eng.wait_for_dag(DRIFT_DAG)
        yield {"stack": stack, "engine": eng, "inbox": inbox}
    finally:
        if eng is not None:
            eng.close()
        inbox.close()
        stack.close()


@pytest.fixture(scope="module")
def quarterly(engine):
    eng = engine["engine"]
    started = time.monotonic()
    run_id = eng.trigger(DAG, {"reason": REASON, "window_start": WINDOW[0].isoformat(),
                               "window_end": WINDOW[1].isoformat()})
    state = eng.wait_run(DAG, run_id, timeout=1200)
    trace = eng.task_instances(DAG, run_id)
    print(f"\n{DAG} {run_id}: {state} in {time.monotonic() - started:.0f} s")
    _print_trace(trace)
    _print_failed_logs(eng, DAG, run_id, trace)
    return {"run_id": run_id, "state": state, "trace": trace}


def _print_trace(trace: list[dict]) -> None:
    print(f"    {'task':40s} {'worker':28s} {'queue':8s} {'pool':13s} {'state':8s} try")
    for t in trace:
        label = t["task_id"] + (f"[{t['label'] or t['map_index']}]" if t["map_index"] != "-1" else "")
        print(f"    {label:40s} {t['hostname']:28s} {t['queue']:8s} {t['pool']:13s} {t['state']:8s} {t['try_number']}")


def _print_failed_logs(eng, dag_id: str, run_id: str, trace: list[dict]) -> None:
    """The end of each failed task's log (the workers write them under AIRFLOW_HOME/logs), to read the cause."""
    logs = eng.root / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    for t in trace:
        if t["state"] == "failed":
            for f in sorted((logs / f"task_id={t['task_id']}").rglob("*.log"))[-1:]:
                print(f"--- {f.relative_to(logs)}\n{f.read_text(errors='replace')[-3000:]}")


def test_quarterly_run_through_the_rest_api_on_celery_workers(engine, quarterly):
    eng, stack = engine["engine"], engine["stack"]
    assert quarterly["state"] == "success", eng.root
    trace = quarterly["trace"]
    states = Counter(t["state"] for t in trace)
    assert not {"failed", "upstream_failed"} & set(states) and states["success"] >= 15, states
    # The LLM's quantization ran on the GPU worker, in its one-slot pool; everything else on the default queue.
    (llm,) = [t for t in trace if t["task_id"] == "llm_4bit_challenger"]
    assert (llm["hostname"], llm["queue"], llm["pool"]) == (eng.worker_name("gpu"), "gpu", "llm_gpu")
    others = [t for t in trace if t["task_id"] != "llm_4bit_challenger" and t["state"] == "success"]
    assert {t["hostname"] for t in others} == {eng.worker_name("default")}
    assert {t["queue"] for t in others} == {"default"} and {t["pool"] for t in others} == {"default_pool"}
    # The run's reason, given through the REST API, is on its MLflow runs.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url, registry_uri=stack.mlflow.url)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.`airflow.run_id` = '{quarterly['run_id']}'", max_results=500)
    assert runs and {r.data.tags["trigger.reason"] for r in runs} == {REASON}
    assert {r.info.status for r in runs} == {"FINISHED"}  # report and the teardown left nothing RUNNING
    # Models registered on the server; their files in S3.
    assert {"mangaassist-intent-classifier", "mangaassist-fallback-llm"} <= set(stack.registry())
    assert any(k.endswith("model.onnx") for k in stack.objects(ARTIFACTS))
    assert any(k.endswith("manifest.json") for k in stack.objects(MLOPS))


def test_xcoms_hold_ids_and_uris_only(engine, quarterly):
    stack = engine["stack"]
    rows = stack.pg.sql(f"SELECT task_id, map_index, key, value::text FROM xcom WHERE dag_id = '{DAG}' AND "
                        f"run_id = '{quarterly['run_id']}'", db="airflow")
    values = [line.split("|", 3) for line in rows.splitlines() if line]
    assert len(values) >= 10
    for task_id, _, key, raw in values:
        assert len(raw) < 16_000, (task_id, key, len(raw))
        strings = list(_strings(json.loads(raw)))
        # no request text, no rows, no weights: every string is an id, a name, a URI or a short message
        assert all(len(s) < 400 for s in strings), (task_id, key, max(strings, key=len))
        if key == "_link_MlflowRunLink":
            assert json.loads(raw).startswith(stack.mlflow.url + "/#/runs/")
    calibration = json.loads(next(r for t, _, k, r in values if t == "refresh_calibration" and k == "return_value"))
    assert calibration["uri"].startswith(f"s3://{MLOPS}/calibration/")
    # Each task that logged an MLflow run links to it, and the REST API (what the UI shows) serves the link.
    linked = {t for t, _, k, _ in values if k == "_link_MlflowRunLink"}
    assert {"refresh_calibration", "evaluate_champion", "int8_challenger"} <= linked, linked
    links = engine["engine"].rest("GET", f"/dags/{DAG}/dagRuns/{quarterly['run_id']}/taskInstances/"
                                         "refresh_calibration/links")
    assert links["extra_links"]["MLflow run"] == f"{stack.mlflow.url}/#/runs/{calibration['run_id']}", links


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def test_overdue_run_is_reported_by_the_deadline_alert(engine, quarterly):
    """expected_run_minutes is 1 here: the triggerer's deadline callback e-mails that the run overran."""
    subject = engine["inbox"].wait_for(f"run {quarterly['run_id']} is overdue", timeout=120)
    assert subject.startswith("[MangaAssist MLOps] quarterly_recalibration")


def test_drift_triggers_a_recalibration_that_survives_a_killed_worker(engine, quarterly):
    eng, stack, inbox = engine["engine"], engine["stack"], engine["inbox"]
    drift_run = eng.trigger(DRIFT_DAG, {"reason": "engine test: catalogue launch day",
                                        "models": ["intent-classifier"], "window_start": DRIFT_DAY.isoformat(),
                                        "window_end": date.fromordinal(DRIFT_DAY.toordinal() + 1).isoformat(),
                                        "recalibration_days": 7})
    assert eng.wait_run(DRIFT_DAG, drift_run, timeout=600) == "success"
    drift_trace = {t["task_id"]: t["state"] for t in eng.task_instances(DRIFT_DAG, drift_run)}
    assert drift_trace["trigger_recalibration"] == "success", drift_trace
    assert "drift: recalibration of intent-classifier triggered" in inbox.wait_for("drift:", timeout=60)
    triggered = _wait_triggered_run(stack, timeout=120)
    assert triggered.startswith("drift__intent-classifier.")

    registry_before = stack.registry()
    # Kill the default worker, with its task and everything the task started, while int8_challenger runs.
    victim = "int8_challenger"
    _wait_state(eng, triggered, victim, "running", timeout=900)
    time.sleep(3)  # inside the stage, not at its first line
    eng.procs["worker-default"].kill()
    killed_at = time.monotonic()
    eng.start_worker("default", "default", 2)  # the replacement host comes up
    state = eng.wait_run(DAG, triggered, timeout=1200)
    print(f"\nkilled the worker running {victim}; the run ended {state} {time.monotonic() - killed_at:.0f} s later")
    trace = eng.task_instances(DAG, triggered)
    _print_trace(trace)
    assert state == "success"
    (task,) = [t for t in trace if t["task_id"] == victim]
    assert task["state"] == "success" and int(task["try_number"]) == 2  # retried once by the scheduler
    # The lost try was told about, by the retry's callback.
    assert inbox.wait_for(f"task {victim}", timeout=60)
    # Nothing duplicated: one MLflow run per stage of this DAG run, at most one new registered version.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow.url, registry_uri=stack.mlflow.url)
    exps = [e.experiment_id for e in client.search_experiments()]
    mine = client.search_runs(exps, filter_string=f"tags.`airflow.run_id` = '{triggered}'", max_results=1000)
    keys = Counter(r.data.tags.get("qat.run_key") for r in mine if r.data.tags.get("qat.run_key"))
    assert keys and max(keys.values()) == 1, keys
    assert {r.info.status for r in mine} == {"FINISHED"}
    added = {n: sorted(set(v) - set(registry_before.get(n, []))) for n, v in stack.registry().items()}
    assert all(len(v) <= 1 for v in added.values()), added
    print("notifications received:", *inbox.subjects(), sep="\n  ")


def _wait_triggered_run(stack, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run_id = stack.pg.sql(f"SELECT run_id FROM dag_run WHERE dag_id = '{DAG}' AND run_id LIKE 'drift__%' "
                              "ORDER BY id DESC LIMIT 1", db="airflow")
        if run_id:
            return run_id
        time.sleep(2)
    raise TimeoutError("the drift monitor's recalibration run did not appear")


def _wait_state(eng, run_id: str, task_id: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(t["task_id"] == task_id and t["state"] == state for t in eng.task_instances(DAG, run_id)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{task_id} of {run_id} was not {state} within {timeout:.0f} s")
