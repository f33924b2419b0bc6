"""Daily review of models running in shadow (`shadow.review: live`).

A challenger the quarterly run put in @shadow is mirrored live by the serving component: the intent classifier, the
escalation detector and the reranker alike. Once it has run for `shadow.live_window_hours`, this DAG reviews it on
the service's logs (agreement with the champion: the same intent, escalate decision or top passage; per-class
disagreement; overlap@k for the reranker; latency; unanswered mirrors; for the intent classifier the gates on the
reviewed labels that arrived) and acts: promotion, retirement of a failed
shadow, or more shadowing when the evidence is still short. With `shadow.promotion: manual` a passed review waits
for a person: the `approve_<model>` task (Airflow's human-in-the-loop approval, answered in the UI's Required
Actions) asks, and only "Approve" runs `promote_<model>`, which records the approver on the version;
`qat-tasks promote` is the same approval from the command line. Every review is an MLflow run in the model's
experiment.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from qat_tasks.core.config import load_config
from qat_tasks.core.params import MAX_REASON_CHARS, MIN_REASON_CHARS
from qat_tasks.reporting.notifications import dag_arguments

CONFIG = load_config(os.environ.get("QAT_CONFIG"))
SERVED = [m.name for m in CONFIG.models if m.role == "intent_classifier"]


@dag(
    dag_id="shadow_review",
    schedule=CronDataIntervalTimetable("0 6 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mangaassist", "shadow", "promotion"],
    **dag_arguments(CONFIG),  # retries with exponential backoff, execution timeouts, failure notifications
    params={"reason": Param("daily shadow review", type="string", minLength=MIN_REASON_CHARS, maxLength=MAX_REASON_CHARS,
                            description="Why this review runs (kept on its MLflow runs and any promotion).")},
    doc_md=__doc__,
)
def shadow_review():
    @task
    def served_models() -> list[str]:
        return SERVED

    @task(multiple_outputs=False, map_index_template="{{ model_name }}")
    def review(model_name: str, **context) -> dict:
        """Review @shadow on the live logs once its window has passed, then promote, retire or wait."""
        from qat_tasks.core.tracking import RunContext
        from qat_tasks.promotion.shadow import review_live

        dr = context["dag_run"]
        ctx = RunContext(dag_id=dr.dag_id, run_id=dr.run_id, reason=context["params"]["reason"],
                         trigger="scheduled" if "scheduled" in str(dr.run_type).lower() else "manual")
        return review_live(CONFIG, model_name, ctx)

    reviewed = review.expand(model_name=served_models())
    if CONFIG.shadow.promotion != "manual":
        return
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    for model_name in SERVED:
        slug = model_name.replace("-", "_")

        @task.short_circuit(task_id=f"needs_approval_{slug}")
        def needs_approval(model_name: str = model_name) -> dict | None:
            """Go on to the approval only when @shadow passed its live review against today's champion."""
            from qat_tasks.promotion.release import awaiting_approval

            return awaiting_approval(CONFIG, model_name)

        ask = ApprovalOperator(
            task_id=f"approve_{slug}",
            subject=f"Promote {model_name} @shadow to @champion?",
            body=("{% set v = ti.xcom_pull(task_ids='needs_approval_" + slug + "') %}"
                  "**{{ v.registered_model }} v{{ v.version }}** ({{ v.method }}) passed its live shadow review "
                  "against champion v{{ v.champion_version }}: MLflow run `{{ v.review_run }}`; offline gates "
                  "decided by {{ v.gates_decided_by }}. Approve moves @champion to it (the old champion stays "
                  "@previous for `qat-tasks rollback`)."),
            defaults="Reject",  # no answer in time: nothing is promoted
            response_timeout=timedelta(hours=CONFIG.shadow.approval_timeout_hours),
        )

        @task(task_id=f"promote_{slug}")
        def promote_approved(model_name: str = model_name, **context) -> dict:
            """Promote after an "Approve", recording who approved."""
            from qat_tasks.core.tracking import RunContext
            from qat_tasks.promotion.release import approver_of, promote

            response = context["ti"].xcom_pull(task_ids=f"approve_{model_name.replace('-', '_')}")
            dr = context["dag_run"]
            ctx = RunContext(dag_id=dr.dag_id, run_id=dr.run_id, reason=context["params"]["reason"], trigger="manual")
            return promote(CONFIG, model_name, ctx, approved_by=approver_of(response))

        reviewed >> needs_approval() >> ask >> promote_approved()


DAG = shadow_review()
