"""Telling people what the pipeline did: a task or a run failed, a quarterly run is overdue, drift triggered a
recalibration, a model was promoted or rolled back.

Two channels, both optional and both configured by Airflow connections (config `notifications`): e-mail through
Airflow's SmtpNotifier (SMTP provider), and a webhook that takes a JSON {"text": ...} POST, which is the body a
Slack incoming webhook reads. A notification that cannot be sent is logged and never fails the work it reports.

`PipelineNotifier` is the DAGs' on_failure_callback (task and DAG run); `run_overdue` is the quarterly DAG's
deadline callback, awaited in the triggerer; `send` is what stages call (release.promote / rollback, the drift
monitor's trigger).
"""

from __future__ import annotations

import logging
import os

from airflow.sdk import BaseNotifier

from qat_tasks.core.config_operations import NotificationsConfig
from qat_tasks.core.notify import send

__all__ = ["PipelineNotifier", "DriftTriggeredNotifier", "dag_arguments", "run_overdue", "send"]

log = logging.getLogger(__name__)


def settings_from_env() -> NotificationsConfig:
    """The notification settings of the config the DAGs load (QAT_CONFIG)."""
    from qat_tasks.core.config import load_config

    return load_config(os.environ.get("QAT_CONFIG")).notifications


class PipelineNotifier(BaseNotifier):
    """on_failure_callback of the DAGs' tasks (`event="task_failed"`) and DAG runs (`event="run_failed"`)."""

    def __init__(self, event: str, settings: dict | None = None):
        super().__init__()
        self.event, self.settings = event, settings

    def notify(self, context) -> None:
        settings = self.settings if self.settings is not None else settings_from_env()
        subject, text = describe_failure(self.event, context)
        send(settings, self.event, subject, text)


def describe_failure(event: str, context) -> tuple[str, str]:
    dag_run, ti = context.get("dag_run"), context.get("ti") or context.get("task_instance")
    dag_id = getattr(dag_run, "dag_id", None) or getattr(ti, "dag_id", "?")
    run_id = getattr(dag_run, "run_id", None) or getattr(ti, "run_id", "?")
    conf = getattr(dag_run, "conf", None) or {}
    lines = [f"DAG {dag_id}, run {run_id}", f"reason: {conf.get('reason', 'scheduled')}"]
    if event == "task_failed" and ti is not None:
        index = getattr(ti, "map_index", -1)
        task = ti.task_id + (f"[{index}]" if index is not None and index >= 0 else "")
        tries = f"try {getattr(ti, 'try_number', '?')} of {getattr(ti, 'max_tries', 0) + 1}"
        subject = f"{dag_id}: task {task} failed ({tries})"
        lines += [f"task {task} on {getattr(ti, 'hostname', '?')}, {tries}",
                  f"error: {context.get('exception') or 'see the task log'}"]
        if getattr(ti, "log_url", None):
            lines.append(f"log: {ti.log_url}")
    else:
        subject = f"{dag_id}: run {run_id} failed"
        reason = context.get("reason")
        if reason:
            lines.append(f"why: {reason}")
    return subject, "\n".join(lines)


async def run_overdue(settings: dict, expected_minutes: float, context: dict | None = None) -> None:
    """Deadline callback (triggerer): the quarterly run is still going `expected_minutes` after it was queued."""
    # The scheduler hands the run over as the REST API's DAG run (dag_run_id, queued_at, conf, ...).
    dag_run = (context or {}).get("dag_run") or {}
    dag_id = dag_run.get("dag_id") or "quarterly_recalibration"
    run_id = dag_run.get("dag_run_id") or dag_run.get("run_id") or "?"
    reason = (dag_run.get("conf") or {}).get("reason", "scheduled")
    subject = f"{dag_id}: run {run_id} is overdue"
    text = (f"DAG {dag_id}, run {run_id} ({reason}) was queued at {dag_run.get('queued_at', '?')} and is still "
            f"running after {expected_minutes:g} minutes (scheduling.expected_run_minutes). It goes on; look at "
            f"which task holds it.")
    import asyncio

    await asyncio.to_thread(send, settings, "run_overdue", subject, text)  # SMTP and HTTP block: off the loop


def dag_arguments(cfg, overdue: bool = False) -> dict:
    """What a DAG passes to @dag so people are told: default_args with each task's retries, timeout and failure
    notification; the run's failure notification; with `overdue`, a deadline alert `expected_run_minutes` after
    the run was queued. Without a channel configured, only the retries and the timeout."""
    from datetime import timedelta

    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    settings = cfg.notifications
    default_args = cfg.scheduling.task_defaults()
    if not settings.enabled:
        return {"default_args": default_args}
    # A try that fails is told about whether Airflow retries it (on_retry) or gives up (on_failure).
    default_args["on_failure_callback"] = [PipelineNotifier("task_failed")]
    default_args["on_retry_callback"] = [PipelineNotifier("task_failed")]
    out = {"default_args": default_args, "on_failure_callback": [PipelineNotifier("run_failed")]}
    if overdue and "run_overdue" in settings.events:
        minutes = cfg.scheduling.expected_run_minutes
        out["deadline"] = DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(minutes=minutes),
            callback=AsyncCallback(run_overdue, kwargs={"settings": settings.model_dump(mode="json"),
                                                        "expected_minutes": minutes}))
    return out


class DriftTriggeredNotifier(BaseNotifier):
    """on_success_callback of the drift monitor's trigger: a recalibration was asked for, and why."""

    def notify(self, context) -> None:
        task = context.get("task")
        conf = getattr(task, "conf", None) or {}
        run_id = getattr(task, "trigger_run_id", None) or "?"
        models = ", ".join(conf.get("models") or []) or "all models"
        subject = f"drift: recalibration of {models} triggered"
        text = "\n".join([f"run {run_id} of {getattr(task, 'trigger_dag_id', 'quarterly_recalibration')} "
                          f"was triggered by the drift monitor", f"models: {models}",
                          f"reason: {conf.get('reason', '?')}",
                          f"window: {conf.get('window_start', '?')} .. {conf.get('window_end', '?')}"])
        send(settings_from_env(), "drift_triggered", subject, text)
