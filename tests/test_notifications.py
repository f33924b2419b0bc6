"""People are told: e-mail through Airflow's SmtpNotifier to a real SMTP server on loopback (aiosmtpd), the
webhook (Slack's JSON body) to a real HTTP server on loopback; a channel that is down never fails the work; the
promotion and rollback of a registered model each send one notification, and a rerun sends none."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from qat_tasks.core.config import ConfigError
from qat_tasks.core.config_operations import NotificationsConfig
from qat_tasks.reporting import notifications

from .stack import Inbox, free_port


class Webhook:
    def __init__(self):
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def channels(monkeypatch):
    inbox, hook = Inbox(), Webhook()
    monkeypatch.setenv("AIRFLOW_CONN_QAT_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": inbox.port,
        "extra": {"disable_ssl": True, "disable_tls": True}}))
    monkeypatch.setenv("AIRFLOW_CONN_QAT_SLACK", json.dumps({"conn_type": "http", "host": hook.url}))
    yield inbox, hook
    inbox.close()
    hook.server.shutdown()


SETTINGS = {"smtp_conn_id": "qat_smtp", "email_to": ["oncall@example.com"], "webhook_conn_id": "qat_slack"}


def test_one_notification_reaches_both_channels(channels):
    inbox, hook = channels
    sent = notifications.send(SETTINGS, "promoted", "intent-classifier: promoted v3", "reason: <quarterly>")
    assert sent == ["email", "webhook"]
    (msg,) = inbox.messages
    assert msg["Subject"] == "[MangaAssist MLOps] intent-classifier: promoted v3"
    assert msg["To"] == "oncall@example.com" and msg["X-MangaAssist-Event"] == "promoted"
    assert "reason: &lt;quarterly&gt;" in inbox.bodies()[0]  # escaped into the HTML body
    (post,) = hook.posts
    assert post["event"] == "promoted" and post["text"].startswith("*[MangaAssist MLOps] intent-classifier")


def test_events_not_listed_and_unconfigured_channels_send_nothing(channels):
    inbox, hook = channels
    assert notifications.send({**SETTINGS, "events": ["task_failed"]}, "promoted", "s", "t") == []
    assert notifications.send({}, "task_failed", "s", "t") == []
    assert inbox.messages == [] and hook.posts == []


def test_a_channel_that_is_down_is_logged_and_never_raises(monkeypatch, caplog):
    monkeypatch.setenv("AIRFLOW_CONN_QAT_SMTP", json.dumps({"conn_type": "smtp", "host": "127.0.0.1",
                                                            "port": free_port(), "extra": {"disable_ssl": True,
                                                                                           "disable_tls": True,
                                                                                           "retry_limit": 0}}))
    monkeypatch.setenv("AIRFLOW_CONN_QAT_SLACK", json.dumps({"conn_type": "http",
                                                             "host": f"http://127.0.0.1:{free_port()}/x"}))
    assert notifications.send(SETTINGS, "run_failed", "s", "t") == []
    assert "could not e-mail run_failed" in caplog.text and "could not post run_failed" in caplog.text


def test_smtp_without_recipients_is_a_config_error_naming_the_key(make_config):
    with pytest.raises(ConfigError, match="email_to"):
        make_config(notifications={"smtp_conn_id": "qat_smtp"})
    with pytest.raises(ConfigError, match="evnets"):
        make_config(notifications={"webhook_conn_id": "x", "evnets": ["promoted"]})


def test_failure_and_overdue_messages(channels):
    inbox, hook = channels

    class TI:
        dag_id, run_id, task_id, map_index, try_number, max_tries = "quarterly_recalibration", "r1", "int8", 2, 1, 2
        hostname, log_url = "worker-a", "http://airflow/log"

    class Run:
        dag_id, run_id, conf = "quarterly_recalibration", "r1", {"reason": "new catalogue"}

    context = {"ti": TI(), "dag_run": Run(), "exception": RuntimeError("ORT session died")}
    notifier = notifications.PipelineNotifier("task_failed", SETTINGS)
    notifier.notify(context)
    asyncio.run(notifications.run_overdue(SETTINGS, 720.0, {"dag_run": {"dag_id": "quarterly_recalibration",
                                                                        "dag_run_id": "r2"}}))
    subjects = [m["Subject"] for m in inbox.messages]
    assert subjects == ["[MangaAssist MLOps] quarterly_recalibration: task int8[2] failed (try 1 of 3)",
                        "[MangaAssist MLOps] quarterly_recalibration: run r2 is overdue"]
    body = inbox.bodies()[0]
    assert "ORT session died" in body and "worker-a" in body and "new catalogue" in body
    assert "720 minutes" in inbox.bodies()[1] and len(hook.posts) == 2


def test_promotion_and_rollback_each_tell_once(channels, intent_registry):
    """v2 passes its shadow review and is promoted over v1, then rolled back: two notifications; the same
    promotion asked again (a retried task) finds its finished run and sends nothing more."""
    from qat_tasks.core.tracking import RunContext
    from qat_tasks.promotion import release, shadow

    from .test_shadow import mirrored

    inbox, _ = channels
    cfg = intent_registry["cfg"].model_copy(update={"notifications": NotificationsConfig(
        smtp_conn_id="qat_smtp", email_to=("oncall@example.com",))})
    ctx = RunContext("test", "notify-run", "shadow review passed", "test")
    assert shadow.review(cfg, "intent-classifier", mirrored(intent_registry["name"], 400), ctx, "test")["verdict"] \
        == "passed"
    release.promote(cfg, "intent-classifier", ctx)
    release.promote(cfg, "intent-classifier", ctx)
    release.rollback(cfg, "intent-classifier", RunContext("test", "notify-rollback", "P95 regression", "test"))
    subjects = [m["Subject"] for m in inbox.messages]
    assert subjects == ["[MangaAssist MLOps] mangaassist-intent-classifier: promoted v2 to @champion (@previous v1)",
                        "[MangaAssist MLOps] mangaassist-intent-classifier: rolled back: @champion v2 -> v1"]
    assert "P95 regression" in inbox.bodies()[1]
