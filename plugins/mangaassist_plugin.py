"""Airflow UI plugin: a navigation link to the MLflow UI, where every run of the pipeline is reviewed, an
"MLflow run" link on each task that logged one, and a template macro that builds MLflow links for notifications."""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

from qat_tasks.reporting.airflow_links import MlflowRunLink

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://localhost:5000")


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    return f"{MLFLOW_UI_URL.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MangaAssistPlugin(AirflowPlugin):
    name = "mangaassist"
    macros = [mlflow_run_url]
    global_operator_extra_links = [MlflowRunLink()]
    external_views = [{"name": "MLflow experiments", "href": MLFLOW_UI_URL, "destination": "nav",
                       "category": "browse"}]
