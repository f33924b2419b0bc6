"""From each Airflow task to the MLflow run it logged: the task stores the run's URL as its "MLflow run" extra
link (the plugin registers the link for every operator; Airflow 3 reads a link's URL from the task's XCom)."""

from __future__ import annotations

from airflow.sdk import BaseOperatorLink

from qat_tasks.core.notify import mlflow_run_url

LINK_NAME = "MLflow run"


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
