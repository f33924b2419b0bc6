"""Airflow UI plugin: a navigation link to the MLflow UI, where every run of the pipeline is reviewed,
and a template macro that builds MLflow links for notifications."""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://localhost:5000")


def mlflow_run_url(experiment_id: str, run_id: str) -> str:
    return f"{MLFLOW_UI_URL.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class MangaAssistPlugin(AirflowPlugin):
    name = "mangaassist"
    macros = [mlflow_run_url]
    external_views = [{"name": "MLflow experiments", "href": MLFLOW_UI_URL, "destination": "nav",
                       "category": "browse"}]
