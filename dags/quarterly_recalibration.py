"""Quarterly recalibration of the MangaAssist models.

Scheduled at 00:00 UTC on 1 January, April, July and October over the quarter that just ended; also run by
hand or by the drift monitor with a reason:

    airflow dags trigger quarterly_recalibration \
        --conf '{"reason": "new manga catalogue launched", "models": ["intent-classifier"]}'

The graph only wires stages together: every stage lives in `qat_tasks` (runnable without Airflow through
`qat-tasks`), tasks import it inside their bodies, and hand each other MLflow run ids and artifact URIs,
never data or models.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from qat_tasks.core.config import load_config
from qat_tasks.core.params import MAX_REASON_CHARS, MIN_REASON_CHARS
from qat_tasks.reporting.airflow_links import link_mlflow_run
from qat_tasks.reporting.notifications import dag_arguments

CONFIG = load_config(os.environ.get("QAT_CONFIG"))  # pydantic + yaml only: cheap, and a broken config is an import error
MODEL_NAMES = [m.name for m in CONFIG.models]
TIMEOUT = CONFIG.scheduling.task_timeout  # each task's execution timeout (scheduling.task_timeouts_minutes)


@dag(
    dag_id="quarterly_recalibration",
    # Explicitly a data-interval timetable: the run at 00:00 UTC on 1 October covers [1 July, 1 October).
    schedule=CronDataIntervalTimetable("0 0 1 1,4,7,10 *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mangaassist", "quantization", "calibration"],
    # Retries with exponential backoff, execution timeouts, failure notifications and the overdue alert (config).
    **dag_arguments(CONFIG, overdue=True),
    params={
        "reason": Param("scheduled quarterly recalibration", type="string", minLength=MIN_REASON_CHARS, maxLength=MAX_REASON_CHARS,
                        description="Why this run happens (kept on every MLflow run it makes)."),
        "triggered_by": Param("manual", type="string", enum=["manual", "drift"],
                              description="Who asked, for runs that are not scheduled."),
        "models": Param([], type="array", items={"type": "string", "enum": MODEL_NAMES}, uniqueItems=True,
                        description="Subset of models to recalibrate; empty means all."),
        "window_start": Param(None, type=["null", "string"], format="date",
                              description="First day of the traffic window (UTC); default: last full quarter."),
        "window_end": Param(None, type=["null", "string"], format="date",
                            description="Day after the last day of the window (exclusive)."),
    },
    doc_md=__doc__,
)
def quarterly_recalibration():
    # multiple_outputs=False: a task's result is one XCom, not one per key of the returned dict.
    @task(multiple_outputs=False, execution_timeout=TIMEOUT("plan"))
    def plan(**context) -> dict:
        """Validate the run's parameters and fix its traffic window and model list."""
        from qat_tasks.pipeline import plan_run

        dr = context["dag_run"]
        return plan_run(CONFIG, context["params"], dag_id=dr.dag_id, run_id=dr.run_id, run_type=str(dr.run_type),
                        reference=dr.logical_date or dr.run_after,
                        interval=(context.get("data_interval_start"), context.get("data_interval_end")))

    @task(multiple_outputs=False, execution_timeout=TIMEOUT("refresh_calibration"))
    def refresh_calibration(run: dict) -> dict:
        """Stream the window's logs into a versioned calibration / QAT-training / evaluation set."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "refresh_calibration", "", run))

    @task
    def tracked_models(run: dict) -> list[str]:
        """The selected models whose quarterly track exists (mapped over below)."""
        from qat_tasks.pipeline import tracked_models

        return tracked_models(CONFIG, run)

    @task(multiple_outputs=False, map_index_template="{{ model_name }}",
          execution_timeout=TIMEOUT("ensure_champion"))
    def ensure_champion(run: dict, calibration: dict, model_name: str) -> dict:
        """Find @champion, or fine-tune, register and alias an FP32 one."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "ensure_champion", model_name, run, calibration, model_name))

    @task(multiple_outputs=False, map_index_template="{{ champion['model'] }}",
          execution_timeout=TIMEOUT("evaluate_champion"))
    def evaluate_champion(run: dict, calibration: dict, champion: dict) -> dict:
        """Measure the champion in ONNX Runtime on the reviewed evaluation split."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "evaluate_champion", champion["model"], run, calibration, champion))

    @task(multiple_outputs=False, map_index_template="{{ champion['model'] }}",
          execution_timeout=TIMEOUT("int8_challenger"))
    def int8_challenger(run: dict, calibration: dict, champion: dict) -> dict:
        """Build INT8 candidates, measure them beside the champion, gate them, register the best as @challenger."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "int8_challenger", champion["model"], run, calibration, champion))

    @task(multiple_outputs=False, map_index_template="{{ decision['model'] }}",
          execution_timeout=TIMEOUT("shadow_and_promote"))
    def shadow_and_promote(run: dict, calibration: dict, decision: dict) -> dict:
        """Put the new @challenger in @shadow; replay mode reviews it on logged traffic and promotes on evidence."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "shadow_and_promote", decision["model"], run, calibration, decision))

    @task
    def llm_models(run: dict) -> list[str]:
        """The selected LLMs (4-bit track, mapped over below)."""
        from qat_tasks.pipeline import llm_models

        return llm_models(CONFIG, run)

    # Production: Celery queue `gpu` and a one-slot pool, so one quantization holds the GPU at a time; the
    # embedded default runs it on the same CPU worker as everything else (configs' `scheduling`).
    @task(multiple_outputs=False, map_index_template="{{ model_name }}", queue=CONFIG.scheduling.llm_queue,
          pool=CONFIG.scheduling.llm_pool, execution_timeout=TIMEOUT("llm_4bit_challenger"))
    def llm_4bit_challenger(run: dict, calibration: dict, model_name: str) -> dict:
        """Quantize the LLM with RTN, AWQ and GPTQ, judge each against the unquantized model, register the best."""
        from qat_tasks.pipeline import run_task

        return link_mlflow_run(run_task(CONFIG, "llm_4bit_challenger", model_name, run, calibration, model_name))

    # none_failed: a run for a subset of models skips the other track's (empty) mapped tasks, and still reports.
    @task(multiple_outputs=False, trigger_rule="none_failed", execution_timeout=TIMEOUT("report"))
    def report(run: dict, calibration: dict, champions: list[dict], evaluations: list[dict], decisions: list[dict],
               llm_decisions: list[dict], shadows: list[dict]) -> dict:
        """Close the per-model parent runs, write the memory budget, print what happened and what each task cost."""
        from qat_tasks.pipeline import report_stage

        # Index by length: iterating the lazy sequence probes one past the end and logs a spurious error.
        return report_stage(CONFIG, run, calibration, [evaluations[i] for i in range(len(evaluations))],
                            [decisions[i] for i in range(len(decisions))],
                            [llm_decisions[i] for i in range(len(llm_decisions))],
                            [shadows[i] for i in range(len(shadows))], [champions[i] for i in range(len(champions))])

    run = plan()
    calibration = refresh_calibration(run)
    champions = ensure_champion.partial(run=run, calibration=calibration).expand(model_name=tracked_models(run))
    evaluations = evaluate_champion.partial(run=run, calibration=calibration).expand(champion=champions)
    decisions = int8_challenger.partial(run=run, calibration=calibration).expand(champion=champions)
    evaluations >> decisions  # the champion's own figures first: a failed evaluation stops the track
    shadows = shadow_and_promote.partial(run=run, calibration=calibration).expand(decision=decisions)
    llm_decisions = llm_4bit_challenger.partial(run=run, calibration=calibration).expand(model_name=llm_models(run))
    @task(execution_timeout=TIMEOUT("close_mlflow_runs"))
    def close_mlflow_runs(**context) -> dict:
        """Teardown, whatever failed: end every MLflow run this DAG run left RUNNING as FAILED (report closes the
        tracks that finished), so no parent run stays RUNNING after a failed task."""
        from qat_tasks.core.tracking import close_open_runs

        return close_open_runs(CONFIG, context["dag_run"].run_id)  # plan's run id: the tag on every MLflow run

    reported = report(run, calibration, champions, evaluations, decisions, llm_decisions, shadows)
    reported >> close_mlflow_runs().as_teardown()


DAG = quarterly_recalibration()
