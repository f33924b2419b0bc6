"""Daily review of models running in shadow (`shadow.review: live`).

A challenger the quarterly run put in @shadow is mirrored live by the serving component. Once it has run for
`shadow.live_window_hours`, this DAG reviews it on the service's logs (agreement, per-class disagreement, latency,
unanswered mirrors, gates on the reviewed labels that arrived) and acts: promotion (or a wait for
`qat-tasks promote` when `shadow.promotion: manual`), retirement of a failed shadow, or more shadowing when the
evidence is still short. Every review is an MLflow run in the model's experiment.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import CronDataIntervalTimetable, Param, dag, task

from qat_tasks.core.config import load_config
from qat_tasks.core.params import MAX_REASON_CHARS, MIN_REASON_CHARS

CONFIG = load_config(os.environ.get("QAT_CONFIG"))
SERVED = [m.name for m in CONFIG.models if m.role == "intent_classifier"]


@dag(
    dag_id="shadow_review",
    schedule=CronDataIntervalTimetable("0 6 * * *", timezone="UTC"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["mangaassist", "shadow", "promotion"],
    default_args=CONFIG.scheduling.task_defaults(),  # retries with exponential backoff (config)
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

    review.expand(model_name=served_models())


DAG = shadow_review()
