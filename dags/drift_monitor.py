"""Daily drift monitor of the MangaAssist encoders that read the user's text.

At 02:00 UTC it compares the previous day's logged traffic with the statistics stored when each champion was
calibrated (activations after LayerNorm and in the feed-forward GELU, input lengths, [UNK] share, language,
predictions; PSI and KS per feature, see qat_tasks/monitoring/drift.py), logs one MLflow run per model ("drift check
<day>", stage drift-check, in the model's experiment) and, when a model has drifted, triggers
`quarterly_recalibration` with the reason, the drifted models and a window ending with the checked traffic.
One recalibration is requested per drift state (model, champion version, calibration version): a drift that
persists while the champion is unchanged is logged every day but triggers once (the triggered run's id is
`drift__<state>`; a second request is skipped).

A manual run, with a reason (3..500 characters), a window and a subset of models, all validated:

    airflow dags trigger drift_monitor \
        --conf '{"reason": "catalogue launch on 2026-11-16: check before the weekend",
                 "models": ["intent-classifier"], "window_start": "2026-11-16", "window_end": "2026-11-23"}'

Without a window a manual run checks the last `drift.window_days` days before its logical date. Set
`drift.trigger: false` in the config to report without triggering.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from qat_tasks.core.config import load_config
from qat_tasks.core.params import MAX_REASON_CHARS, MIN_REASON_CHARS
from qat_tasks.reporting.notifications import DriftTriggeredNotifier, dag_arguments

CONFIG = load_config(os.environ.get("QAT_CONFIG"))  # pydantic + yaml only: cheap, and a broken config is an import error
RECALIBRATION_DAG = "quarterly_recalibration"


@dag(
    dag_id="drift_monitor",
    # The run at 02:00 UTC on day D covers [D-1 02:00, D 02:00): the check reads day D-1's partition.
    schedule=CronDataIntervalTimetable("0 2 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mangaassist", "quantization", "drift"],
    **dag_arguments(CONFIG),  # retries with exponential backoff, execution timeouts, failure notifications
    params={
        "reason": Param("daily drift check", type="string", minLength=MIN_REASON_CHARS, maxLength=MAX_REASON_CHARS,
                        description="Why this run happens (kept on every MLflow run it makes)."),
        "models": Param([], type="array", items={"type": "string", "enum": CONFIG.drift_models}, uniqueItems=True,
                        description="Subset of the monitored models; empty means all."),
        "window_start": Param(None, type=["null", "string"], format="date",
                              description="First day of traffic to check (UTC); default: the data interval "
                                          "(scheduled) or the last drift.window_days days (manual)."),
        "window_end": Param(None, type=["null", "string"], format="date",
                            description="Day after the last day checked (exclusive)."),
        "recalibration_days": Param(30, type="integer", minimum=7, maximum=92,
                                    description="Days of traffic, ending with the checked window, that a triggered "
                                                "recalibration calibrates on."),
    },
    doc_md=__doc__,
)
def drift_monitor():
    @task(multiple_outputs=False)
    def plan(**context) -> dict:
        """Validate the parameters and fix the traffic window and the models to check."""
        from qat_tasks.monitoring.drift import plan_check

        dr = context["dag_run"]
        return plan_check(CONFIG, context["params"], dag_id=dr.dag_id, run_id=dr.run_id, run_type=str(dr.run_type),
                          reference=dr.logical_date or dr.run_after,
                          interval=(context.get("data_interval_start"), context.get("data_interval_end")))

    @task(multiple_outputs=False)
    def check(run: dict) -> dict:
        """Compare the window's traffic with each champion's calibration-time statistics; log to MLflow."""
        from datetime import date

        from qat_tasks.core.tracking import RunContext
        from qat_tasks.monitoring.drift import monitor

        w = run["window"]
        return monitor(CONFIG, date.fromisoformat(w["start"]), date.fromisoformat(w["end"]), RunContext(**run["ctx"]),
                       models=run["models"])

    @task.short_circuit(multiple_outputs=False)
    def recalibration_request(run: dict, result: dict) -> dict | None:
        """The recalibration's conf when something drifted and drift.trigger is on; else skip the trigger."""
        from qat_tasks.monitoring.drift import recalibration_request

        return recalibration_request(CONFIG, run, result)

    run = plan()
    result = check(run)
    request = recalibration_request(run, result)
    trigger = TriggerDagRunOperator(
        task_id="trigger_recalibration",
        trigger_dag_id=RECALIBRATION_DAG,
        trigger_run_id="drift__{{ ti.xcom_pull(task_ids='check')['drift_key'] }}",
        conf=request,
        wait_for_completion=False,
        skip_when_already_exists=True,  # this drift state was already handed to a recalibration
        on_success_callback=[DriftTriggeredNotifier()] if CONFIG.notifications.enabled else None,
    )
    request >> trigger


DAG = drift_monitor()
