"""From each Airflow task to the MLflow run it logged: the task stores the run's URL as its "MLflow run" extra
link (the plugin registers the link for every operator; Airflow 3 reads a link's URL from the task's XCom)."""

from __future__ import annotations

import os

from airflow.sdk import BaseOperatorLink

LINK_NAME = "MLflow run"


def mlflow_run_url(run_id: str) -> str | None:
    """The MLflow UI's page of a run (the UI finds the run's experiment itself): MLFLOW_UI_URL, else the tracking
    server's address; None for a local file or SQLite store, which has no UI address."""
    base = os.environ.get("MLFLOW_UI_URL") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not base.startswith(("http://", "https://")):
        return None
    return f"{base.rstrip('/')}/#/runs/{run_id}"


class MlflowRunLink(BaseOperatorLink):
    name = LINK_NAME

    def get_link(self, operator, *, ti_key) -> str:
        """Asked by the API server (the UI's link): the URL the task stored, read from the metadata database the way
        Airflow reads the links of deserialized operators."""
        from airflow.serialization.definitions.operatorlink import XComOperatorLink

        return XComOperatorLink(name=self.name, xcom_key=self.xcom_key).get_link(operator, ti_key=ti_key) or ""


def link_mlflow_run(result: dict) -> dict:
    """Called in a task with the stage's result: store the link to the stage's MLflow run, if it made one."""
    url = mlflow_run_url(result.get("run_id") or "") if isinstance(result, dict) else None
    if url:
        from airflow.sdk import get_current_context

        get_current_context()["ti"].xcom_push(key=MlflowRunLink().xcom_key, value=url)
    return result
