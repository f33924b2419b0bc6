"""Sending a notification: e-mail through Airflow's SmtpNotifier (SMTP provider) and a webhook that takes a JSON
{"text": ...} POST (the body a Slack incoming webhook reads), both configured by Airflow connections (config
`notifications`). A notification that cannot be sent is logged and never fails the work it reports. Stages call
`send` (a promotion, a rollback); the DAGs' callbacks are in `qat_tasks.reporting.notifications`."""

from __future__ import annotations

import html
import json
import logging
import os
import urllib.request

from qat_tasks.core.config_operations import NotificationsConfig

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "[MangaAssist MLOps]"


def send(settings: NotificationsConfig | dict, event: str, subject: str, text: str) -> list[str]:
    """Send one notification on every configured channel; returns the channels that took it."""
    settings = (settings if isinstance(settings, NotificationsConfig)
                else NotificationsConfig.model_validate_json(json.dumps(settings)))
    if event not in settings.events or not settings.enabled:
        return []
    subject = f"{SUBJECT_PREFIX} {subject}"
    sent = []
    if settings.smtp_conn_id:
        try:
            from airflow.providers.smtp.notifications.smtp import SmtpNotifier

            body = "<pre>" + html.escape(text) + "</pre>"
            SmtpNotifier(to=list(settings.email_to), from_email=settings.email_from, subject=subject,
                         html_content=body, smtp_conn_id=settings.smtp_conn_id,
                         custom_headers={"X-MangaAssist-Event": event}).notify({})
            sent.append("email")
        except Exception:
            log.exception("could not e-mail %s through connection %s", event, settings.smtp_conn_id)
    if settings.webhook_conn_id:
        try:
            _post_webhook(settings.webhook_conn_id, {"text": f"*{subject}*\n{text}", "event": event})
            sent.append("webhook")
        except Exception:
            log.exception("could not post %s to webhook connection %s", event, settings.webhook_conn_id)
    if sent:
        log.info("told people (%s): %s", ", ".join(sent), subject)
    return sent


def _post_webhook(conn_id: str, payload: dict) -> None:
    from airflow.sdk import Connection

    conn = Connection.get(conn_id)
    url = _webhook_url(conn)
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        if resp.status >= 300:
            raise RuntimeError(f"webhook answered {resp.status}")


def _webhook_url(conn) -> str:
    """The connection's URL: its host when that is a whole URL (Slack's hooks.slack.com/services/...), else
    schema://host:port/path from its fields; a password is the path's secret part (Slack's token path)."""
    host = conn.host or ""
    if "://" in host:
        return host.rstrip("/") + (f"/{conn.password}" if conn.password else "")
    scheme = conn.schema or ("https" if conn.conn_type in ("slackwebhook", "https") else "http")
    port = f":{conn.port}" if conn.port else ""
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    path = str(extra.get("path", "")).strip("/")
    url = f"{scheme}://{host}{port}" + (f"/{path}" if path else "")
    return url + (f"/{conn.password}" if conn.password else "")



def mlflow_run_url(run_id: str) -> str | None:
    """The MLflow UI's page of a run (the UI finds the run's experiment itself): MLFLOW_UI_URL, else the tracking
    server's address; None for a local file or SQLite store, which has no UI address."""
    base = os.environ.get("MLFLOW_UI_URL") or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not run_id or not base.startswith(("http://", "https://")):
        return None
    return f"{base.rstrip('/')}/#/runs/{run_id}"
