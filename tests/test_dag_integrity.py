"""The DAG folder loads cleanly, the quarterly DAG has the promised shape, and parsing it is cheap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dagbag(tiny_config_path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "quarterly_recalibration" in dagbag.dags


def test_quarterly_schedule_params_and_retries(dagbag):
    dag = dagbag.dags["quarterly_recalibration"]
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 0 1 1,4,7,10 *"
    assert dag.max_active_runs == 1 and not dag.catchup
    assert set(dag.params) == {"reason", "triggered_by", "models", "window_start", "window_end"}
    for t in dag.tasks:
        assert t.retries >= 2, t.task_id
        assert t.execution_timeout is not None and t.execution_timeout.total_seconds() > 0, t.task_id
    assert {t.task_id for t in dag.tasks} == {"plan", "refresh_calibration", "tracked_models", "ensure_champion",
                                               "evaluate_champion", "int8_challenger", "shadow_and_promote",
                                               "llm_models", "llm_4bit_challenger", "report", "close_mlflow_runs"}
    # Whatever fails, the teardown ends the MLflow runs left RUNNING; it does not decide the run's state.
    close = dag.get_task("close_mlflow_runs")
    assert close.is_teardown and close.upstream_task_ids == {"report"}
    assert dag.get_task("llm_4bit_challenger").execution_timeout.total_seconds() == 8 * 3600
    assert dag.get_task("shadow_and_promote").upstream_task_ids >= {"int8_challenger"}
    assert "evaluate_champion" in dag.get_task("int8_challenger").upstream_task_ids
    # The embedded default runs the LLM beside everything else; production sends it to the GPU queue.
    llm = dag.get_task("llm_4bit_challenger")
    assert (llm.queue, llm.pool) == ("default", "default_pool")
    assert {"llm_4bit_challenger", "int8_challenger", "shadow_and_promote"} <= dag.get_task("report").upstream_task_ids


def _under_production(monkeypatch, dag_file: str):
    """The DAG a file defines when parsed under the production profile."""
    import importlib.util

    monkeypatch.setenv("QAT_CONFIG", str(ROOT / "configs" / "production.yaml"))
    spec = importlib.util.spec_from_file_location(f"prod_{dag_file[:-3]}", ROOT / "dags" / dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DAG


def test_production_config_puts_the_llm_on_the_gpu_queue_and_pool(monkeypatch):
    """Parse the DAG file under the production profile: its LLM task lands on queue gpu, pool llm_gpu."""
    dag = _under_production(monkeypatch, "quarterly_recalibration.py")
    llm = dag.get_task("llm_4bit_challenger")
    assert (llm.queue, llm.pool) == ("gpu", "llm_gpu")
    assert dag.get_task("int8_challenger").queue != "gpu"


def test_production_dags_tell_people(monkeypatch):
    """Under production every task and every run notifies on failure, the quarterly run has an overdue alert
    and the drift monitor's trigger says it asked for a recalibration."""
    from datetime import timedelta

    from qat_tasks.reporting.notifications import DriftTriggeredNotifier, PipelineNotifier

    dag = _under_production(monkeypatch, "quarterly_recalibration.py")
    assert [c.event for c in dag.on_failure_callback] == ["run_failed"]
    for t in dag.tasks:
        assert any(isinstance(c, PipelineNotifier) and c.event == "task_failed" for c in t.on_failure_callback)
    (alert,) = dag.deadline
    assert alert.interval == timedelta(hours=12) and alert.callback.path.endswith("notifications.run_overdue")
    drift = _under_production(monkeypatch, "drift_monitor.py")
    trigger = drift.get_task("trigger_recalibration")
    assert any(isinstance(c, DriftTriggeredNotifier) for c in trigger.on_success_callback)


def test_production_shadow_review_asks_a_person_before_promoting(monkeypatch, dagbag):
    """Under production (shadow.promotion: manual) a passed live review goes to Airflow's approval operator, and
    only its "Approve" reaches the promotion; unanswered it rejects. The embedded default promotes on its own."""
    from datetime import timedelta

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    assert not any(t.task_id.startswith("approve_") for t in dagbag.dags["shadow_review"].tasks)
    dag = _under_production(monkeypatch, "shadow_review.py")
    ask = dag.get_task("approve_intent_classifier")
    assert isinstance(ask, ApprovalOperator) and ask.defaults == ["Reject"]
    assert ask.response_timeout == timedelta(hours=72)
    assert ask.upstream_task_ids == {"needs_approval_intent_classifier"}
    assert dag.get_task("promote_intent_classifier").upstream_task_ids == {"approve_intent_classifier"}
    assert "review" in dag.get_task("needs_approval_intent_classifier").upstream_task_ids


def test_an_approval_names_its_approver_and_a_rejection_names_nobody():
    from qat_tasks.promotion.release import approver_of

    assert approver_of({"chosen_options": ["Approve"], "responded_by_user": {"id": "7", "name": "kenji"}}) == \
        "airflow:kenji"
    assert approver_of({"chosen_options": ["Reject"], "responded_by_user": {"id": "7", "name": "kenji"}}) is None
    assert approver_of({}) is None


def test_params_reject_bad_values(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    params = dagbag.dags["quarterly_recalibration"].params
    for key, bad in [("reason", ""), ("models", ["not-a-model"]), ("window_start", "July"),
                     ("triggered_by", "cron")]:
        with pytest.raises(ParamValidationError):
            params.get_param(key).resolve(bad)
    params.get_param("models").resolve(["intent-classifier"])
    params.get_param("window_start").resolve("2026-07-01")


@pytest.mark.parametrize("dag_file", ["quarterly_recalibration.py", "drift_monitor.py", "shadow_review.py"])
def test_parsing_imports_nothing_heavy(tiny_config_path, dag_file):
    code = ("import sys, runpy, json; runpy.run_path(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in ('torch','transformers','mlflow','onnxruntime','pandas','boto3') "
            "if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "dags" / dag_file)],
                         capture_output=True, text=True, env=os.environ, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
