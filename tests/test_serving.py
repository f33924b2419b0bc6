"""The serving component over real HTTP on loopback, as its own process (`python -m qat_tasks.serving`) or, where
a test scripts the shadow, on a thread here (its shadow still in a process of its own): every encoder answered and
mirrored, logs in the traffic schema, admin token, metrics, a shadow that fails, hangs or dies, reloads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROLE_MODEL_NAMES

ROOT = Path(__file__).resolve().parent.parent
MODEL = "intent-classifier"
TOKEN = "admin-token-for-tests-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["where is my order #12345", "do you have One Piece volume 3", "recommend something like Berserk",
         "I want to return a damaged box set", "my card was charged twice", "hello there!",
         "I need to talk to a human right now", "how long does shipping to Canada take"]
PASSAGES = ["Order status: every order page shows the tracking number once the parcel ships.",
            "Returns are free within 30 days for unopened box sets.", "One Piece volumes 1-105 are in stock.",
            "Shipping to Canada takes 5 to 8 business days.", "Gift cards never expire."]


# -- servers ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def running(service, admin_token: str | None = TOKEN):
    """The real uvicorn server on 127.0.0.1 (ephemeral port) in a thread, and an HTTP client for it; stopping the
    server runs the app's shutdown, which stops the shadow process and flushes the logs."""
    from qat_tasks.serving.app import make_server

    server, sock, url = make_server(service, "127.0.0.1", 0, admin_token)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "server start")
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(40)


@contextlib.contextmanager
def server_process(cfg, tmp_path: Path, *args: str, token: str | None = TOKEN):
    """`python -m qat_tasks.serving` as its own process on an ephemeral loopback port, with its config written
    out; yields (client, process, output lines). Stopped with SIGTERM, as a container runtime stops it."""
    import yaml

    config = tmp_path / "serving.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {k: v for k, v in os.environ.items() if k != "QAT_SERVING_ADMIN_TOKEN"}
    env.update({"PYTHONPATH": str(ROOT), **({"QAT_SERVING_ADMIN_TOKEN": token} if token else {})})
    proc = subprocess.Popen([sys.executable, "-m", "qat_tasks.serving", "--config", str(config), "--host", "127.0.0.1",
                             "--port", "0", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        while not (lines and lines[-1].startswith("listening on ")):  # printed once every model is loaded
            line = proc.stdout.readline()
            assert line, "the service did not start:\n" + "\n".join(lines[-40:])
            lines.append(line.rstrip())
        threading.Thread(target=lambda: lines.extend(x.rstrip() for x in proc.stdout), daemon=True).start()
        with httpx.Client(base_url=lines[-1].split()[2], timeout=10, trust_env=False) as client:
            yield client, proc, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def scrape(client) -> dict:
    """/metrics parsed with prometheus_client's own text parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families: dict, family: str, sample: str | None = None, **labels) -> float:
    """The sum of a family's samples (default: the counter's `_total`) whose labels include `labels`."""
    samples = families[family].samples if family in families else []
    return sum(s.value for s in samples if s.name == (sample or f"{family}_total") and labels.items() <= s.labels.items())


def shadow_accounted(families: dict, model: str) -> tuple[float, float]:
    """(mirrored, answered + errors + timeouts + dropped) of one model: equal once the shadow is idle."""
    outcomes = sum(value(families, f"qat_shadow_{k}", model=model) for k in ("answered", "errors", "timeouts",
                                                                             "dropped"))
    return value(families, "qat_shadow_mirrored", model=model), outcomes


def ask(client, path: str, body: dict) -> dict:
    assert (r := client.post(path, json=body)).status_code == 200, r.text
    return r.json()


def with_serving(cfg, **changes):
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update=changes)})


# -- every role, as a real process ------------------------------------------------------------------------------------
def test_every_encoder_is_answered_mirrored_and_logged_by_the_service_process(encoder_registry, intent_models,
                                                                              role_models, tmp_path):
    from transformers import AutoTokenizer

    from qat_tasks.core.metrics import softmax_t
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.encoders.modeling import OnnxClassifier, softmax
    from qat_tasks.promotion.traffic import read_role_records

    reg, roles = encoder_registry, encoder_registry["roles"]
    names = {role: r["name"] for role, r in roles.items()}
    started = datetime.now(UTC)
    email, phone = "jane.doe+manga@gmail.com", "+44 20 7946 0958"
    queries = [("is there free shipping to canada", 3), (f"mail me the tracking at {email}", 2),
               ("return a damaged box set", 5)]
    candidates = [{"id": f"doc-{i}", "text": p} for i, p in enumerate(PASSAGES)]
    candidates[4] = {"id": "doc-4", "text": f"call us on {phone} for gift cards"}
    with server_process(reg["cfg"], tmp_path) as (client, proc, out):
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["shadow_process"]["up"]
        for role, model_name in (("intent_classifier", MODEL), *ROLE_MODEL_NAMES.items()):
            m = health["models"][model_name]
            assert (m["role"], m["champion"], m["shadow"]) == (role, roles[role]["champion"], roles[role]["shadow"])
            assert m["shadow_state"] == "mirroring" and m["mirroring"] is True
        intents = [ask(client, "/v1/intent", {"text": t, "conversation_id": "conv-s-1", "turn": i, "locale": "en-US"})
                   for i, t in enumerate(TEXTS)]
        escalations = [ask(client, "/v1/escalation", {"text": t, "request_id": f"esc-{i}"})
                       for i, t in enumerate([*TEXTS, f"I am furious, email me at {email}"])]
        reranked = [ask(client, "/v1/rerank", {"query": q, "candidates": candidates, "top_k": k, "request_id": f"rr-{i}"})
                    for i, (q, k) in enumerate(queries)]
        counts = {"intent_classifier": len(intents), "escalation_detector": len(escalations),
                  "reranker": len(reranked)}
        wait_for(lambda: all(value(scrape(client), "qat_shadow_answered", model=names[r]) == n
                             for r, n in counts.items()), 60, "every mirror answered")
        families = scrape(client)
        # Admin routes: refused without the token or with a wrong one, answered with it.
        assert client.post("/admin/mirroring", json={"enabled": False}).status_code == 401
        wrong = client.post("/admin/mirroring", json={"enabled": False}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "wrong admin token"
        assert client.post("/admin/reload", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert client.get("/health").json()["mirroring"] is True
        switched = client.post("/admin/mirroring", json={"enabled": False}, headers=AUTH)
        assert switched.status_code == 200 and switched.json()["mirroring"] is False
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
    # SIGTERM: a graceful stop (uvicorn re-raises the signal once it has shut down), the logs flushed.
    assert proc.returncode in (0, -signal.SIGTERM) and any("stopped; 20 log records written" in x for x in out), out

    # Metrics: histograms of both models' latency per model, counters per model.
    for role, n in counts.items():
        name = names[role]
        for hist in ("qat_champion_latency_seconds", "qat_shadow_latency_seconds"):
            assert families[hist].type == "histogram"
            assert value(families, hist, f"{hist}_count", model=name) == n
            assert value(families, hist, f"{hist}_bucket", model=name, le="+Inf") == n
            assert 0 < value(families, hist, f"{hist}_sum", model=name) < n
        assert families["qat_requests"].type == families["qat_shadow_mirrored"].type == "counter"
        assert value(families, "qat_requests", model=name) == value(families, "qat_shadow_mirrored", model=name) == n
        assert 0 <= value(families, "qat_shadow_agreements", model=name) <= n
        assert shadow_accounted(families, name) == (n, n)
    assert value(families, "qat_shadow_worker_up", "qat_shadow_worker_up") == 1
    assert value(families, "qat_shadow_worker_restarts") == 0

    # The answers are each champion's (v1, FP32), as its ONNX graph computes them.
    def direct(m: dict):
        return OnnxClassifier(m["fp32"], AutoTokenizer.from_pretrained(m["hf"]), m["labels"], m["max_length"])

    scaled = softmax_t(direct(intent_models).logits(TEXTS), reg["temperature"])
    for a, probs in zip(intents, scaled, strict=True):
        assert (a["model"], a["version"], a["intent"]) == (names["intent_classifier"], roles["intent_classifier"]
                                                          ["champion"], intent_models["labels"][probs.argmax()])
        assert a["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
    p = softmax(direct(role_models["escalation_detector"]).logits([*TEXTS, f"I am furious, email me at {email}"]))
    assert [a["p_frustrated"] for a in escalations] == pytest.approx(list(p[:, 1]), abs=1e-5)
    assert [(a["escalate"], a["threshold"]) for a in escalations] == [(bool(x >= 0.5), 0.5) for x in p[:, 1]]
    for (q, k), a in zip(queries, reranked, strict=True):
        logits = direct(role_models["reranker"]).logits([(q, c["text"]) for c in candidates])
        assert [r["index"] for r in a["results"]] == sorted(range(5), key=lambda i: logits[i, 0] - logits[i, 1])[:k]
        assert [r["id"] for r in a["results"]] == [f"doc-{r['index']}" for r in a["results"]]

    # The logs: intent records at the root (what calibration reads, and only those), the others in their folders.
    since, until = started - timedelta(minutes=1), datetime.now(UTC) + timedelta(minutes=1)
    intent_records, stats = read_records(str(reg["log_dir"]), since, until)
    assert stats["invalid"] == 0 and len(intent_records) == 2 * len(TEXTS)
    for role, answers in (("escalation_detector", escalations), ("reranker", reranked)):
        records, stats = read_role_records(str(reg["log_dir"] / ROLE_MODEL_NAMES[role]), since, until, role)
        assert stats["invalid"] == 0 and len(records) == 2 * len(answers)
        logged = {(r.request_id, r.event): r for r in records}
        for a in answers:
            champ = logged[a["request_id"], "inference"]
            assert (a["request_id"], "shadow_inference") in logged and champ.schema_version == 3
            assert champ.model == f"{names[role]}/v{roles[role]['champion']}"
            assert ((champ.escalate, champ.p_frustrated) == (a["escalate"], round(a["p_frustrated"], 6))
                    if role == "escalation_detector" else champ.ranking == [r["index"] for r in a["results"]])
    # Personal data never reaches a file: queries, passages and texts are scrubbed as intents' texts are.
    written = "".join(f.read_text() for f in reg["log_dir"].rglob("*.jsonl"))
    assert email not in written and phone not in written and "gmail" not in written
    scrubbed = {json.loads(line)["request_id"]: json.loads(line)["pii_scrubbed"] for line in written.splitlines()}
    assert scrubbed["esc-8"] == {"EMAIL": 1} and scrubbed["rr-1"] == {"EMAIL": 1, "PHONE": 1}
    assert scrubbed["rr-0"] == scrubbed["rr-2"] == {"PHONE": 1} and "[EMAIL]" in written and "[PHONE]" in written


def test_a_killed_shadow_process_is_counted_and_restarted_while_the_champion_answers(encoder_registry, tmp_path):
    reg = encoder_registry
    names = [reg["name"], reg["roles"]["escalation_detector"]["name"]]
    statuses: list[int] = []
    stop = threading.Event()
    with server_process(reg["cfg"], tmp_path, "--model", MODEL, "--model", "escalation-detector") as (client, _, out):
        health = client.get("/health").json()
        assert set(health["models"]) == {MODEL, "escalation-detector"}  # --model restricts, repeatable
        assert client.post("/v1/rerank", json={"query": "q", "candidates": [{"text": "p"}]}).status_code == 404
        pid = health["shadow_process"]["pid"]

        def traffic() -> None:
            with httpx.Client(base_url=str(client.base_url), timeout=10, trust_env=False) as c:
                for i in range(10**6):
                    if stop.wait(0.01):
                        return
                    path = "/v1/intent" if i % 2 else "/v1/escalation"
                    statuses.append(c.post(path, json={"text": TEXTS[i % len(TEXTS)]}).status_code)

        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        wait_for(lambda: value(scrape(client), "qat_shadow_answered") >= 20, 60, "mirrors answered before the kill")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: value(scrape(client), "qat_shadow_worker_restarts", reason="exited") == 1, 30,
                 "the restart to be counted")
        wait_for(lambda: (h := client.get("/health").json())["shadow_process"]["pid"] not in (None, pid)
                 and all(m["shadow_state"] == "mirroring" for m in h["models"].values()), 120,
                 "a new shadow process mirroring again")
        answered = value(scrape(client), "qat_shadow_answered")
        wait_for(lambda: value(scrape(client), "qat_shadow_answered") >= answered + 20, 60, "mirrors answered after")
        stop.set()
        sender.join(15)
        wait_for(lambda: all(len(set(shadow_accounted(scrape(client), n))) == 1 for n in names), 30,
                 "every mirror accounted for")
        families = scrape(client)
    assert statuses and set(statuses) == {200}, "a request failed while the shadow process died"
    assert value(families, "qat_requests") == len(statuses) and value(families, "qat_request_errors") == 0
    lost = sum(value(families, "qat_shadow_dropped", reason=r) for r in ("worker_lost", "worker_down"))
    assert lost >= 1 and value(families, "qat_shadow_worker_restarts") == 1
    assert any("shadow process" in line and "restarting" in line for line in out)


# -- a scripted shadow, in this process's service ---------------------------------------------------------------------
class ScriptedShadow:
    """A shadow model for the shadow process whose behaviour the test scripts through a JSON file: answer, raise,
    or hang for some seconds (the next `calls` calls of an `epoch`, or every call), waiting or (`cpu`) working."""

    def __init__(self, script: str, package, threads: int):
        from qat_tasks.serving.models import ServedModel

        self.model, self.script, self.used = ServedModel(package, threads), Path(script), {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def answer(self, inputs):
        s = json.loads(self.script.read_text())
        if s["mode"] == "raise":
            raise RuntimeError("shadow exploded")
        if s["mode"] == "hang":
            n = self.used.get(s["epoch"], 0)
            if s.get("calls") is None or n < s["calls"]:
                self.used[s["epoch"]], clock = n + 1, time.thread_time if s.get("cpu") else time.monotonic
                t0 = clock()  # `cpu`: work, which stops while the process is held paused; a wait does not
                while clock() - t0 < s["seconds"]:
                    time.sleep(0 if s.get("cpu") else 0.005)
        return self.model.answer(inputs)


def script(path: Path, **how) -> None:
    path.with_suffix(".tmp").write_text(json.dumps(how))
    os.replace(path.with_suffix(".tmp"), path)  # the shadow process never reads half a script


def test_a_failing_or_hanging_shadow_never_affects_the_champion(intent_registry, tmp_path):
    import functools

    from qat_tasks.serving.executor import MAX_STUCK_CALLS
    from qat_tasks.serving.service import Service

    hang_s, control = 2.0, tmp_path / "shadow-script.json"
    script(control, mode="answer")
    service = Service(with_serving(intent_registry["cfg"], shadow_timeout_ms=300.0), MODEL,
                      shadow_factory=functools.partial(ScriptedShadow, str(control)))
    counts, keys = service.mirror.counts.snapshot, ("intent", "confidence", "version")
    with running(service) as client:
        baseline = {t: ask(client, "/v1/intent", {"text": t}) for t in TEXTS}
        wait_for(lambda: counts()["answered"] == len(TEXTS), 20, "healthy shadow answers")

        def same_as_baseline(texts=TEXTS) -> None:
            for text in texts:
                t0 = time.perf_counter()
                a = ask(client, "/v1/intent", {"text": text})
                assert time.perf_counter() - t0 < hang_s / 2, "a request waited on the shadow"
                assert [a[k] for k in keys] == [baseline[text][k] for k in keys]

        script(control, mode="raise")  # an exception in the shadow: counted, the champion's answers unchanged
        same_as_baseline()
        wait_for(lambda: counts()["errors"] == len(TEXTS), 20, "shadow errors counted")

        script(control, mode="hang", seconds=hang_s, calls=2, epoch=1)  # two calls hang past the deadline
        same_as_baseline()
        wait_for(lambda: counts()["timeouts"] == 2, 20, "two timeouts")
        wait_for(lambda: counts()["answered"] == 2 * len(TEXTS) - 2, 20, "mirroring after the hang")

        # Every call hangs: once the hung calls reach the cap, mirrors are dropped (not queued behind them),
        # /health says so, and mirroring resumes by itself when the hung calls return.
        wait_for(lambda: service.mirror.status["stuck"] == 0, 3 * hang_s, "the earlier hung calls to return")
        script(control, mode="hang", seconds=hang_s, epoch=2)
        same_as_baseline(TEXTS * 2)
        wait_for(lambda: counts()["timeouts"] == 2 + MAX_STUCK_CALLS, 20, "hung calls up to the cap")
        wait_for(lambda: counts()["dropped"] == 2 * len(TEXTS) - MAX_STUCK_CALLS, 20, "the rest dropped")
        wait_for(lambda: client.get("/health").json()["models"][MODEL]["shadow_state"].startswith("stalled"), 5, "")
        script(control, mode="answer")
        wait_for(lambda: service.mirror.status["stuck"] == 0, 3 * hang_s, "the hung calls to return")
        answered = counts()["answered"]
        same_as_baseline(TEXTS[:2])
        wait_for(lambda: counts()["answered"] == answered + 2, 20, "mirroring after the stall")
        families = scrape(client)
    c = counts()
    assert c["mirrored"] == c["answered"] + c["errors"] + c["timeouts"] + c["dropped"] == 5 * len(TEXTS) + 2
    assert value(families, "qat_shadow_dropped", reason="stalled") == 2 * len(TEXTS) - MAX_STUCK_CALLS
    assert value(families, "qat_requests") == 5 * len(TEXTS) + 2 and value(families, "qat_request_errors") == 0


def test_bad_input_mirroring_switch_and_alias_reload(intent_registry):
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving.service import Service

    reg = intent_registry
    client_ml, name = reg["client"], reg["name"]
    service = Service(reg["cfg"], MODEL)
    counts = service.mirror.counts.snapshot
    started = datetime.now(UTC)
    with running(service) as client:
        # Bad input: a 422 that names the field; nothing answered or logged.
        bad = [("/v1/intent", {"text": ""}, "text: "), ("/v1/intent", {"text": "   "}, "text: "),
               ("/v1/intent", {"text": "x" * 4001}, "text: "), ("/v1/intent", {}, "text: Field required"),
               ("/v1/intent", {"text": "hi", "txt": "typo"}, "txt: unknown field"),
               ("/v1/intent", {"text": "hi", "turn": -1}, "turn: "),
               ("/v1/escalation", {"text": "hi", "conversation_id": 7}, "conversation_id: "),
               ("/v1/rerank", {"query": "q", "candidates": []}, "candidates: "),
               ("/v1/rerank", {"query": "q", "candidates": [{"text": " "}]}, "candidates.0.text: "),
               ("/v1/rerank", {"query": "q", "candidates": [{"text": "p"}], "top_k": 0}, "top_k: ")]
        for path, body, problem in bad:
            r = client.post(path, json=body)
            assert r.status_code == 422 and r.json()["error"].startswith(problem), (body, r.text)
        assert client.post("/v1/intent", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        # A role this service does not host: 404 that says so.
        r = client.post("/v1/rerank", json={"query": "q", "candidates": [{"text": "p"}]})
        assert r.status_code == 404 and "does not host a reranker" in r.json()["error"]
        assert value(scrape(client), "qat_requests") == 0

        # Mirroring off at run time: answered, not mirrored; on again: mirrored.
        assert client.post("/admin/mirroring", json={"enabled": False}, headers=AUTH).json()["mirroring"] is False
        ask(client, "/v1/intent", {"text": TEXTS[0]})
        assert counts()["mirrored"] == 0
        assert client.post("/admin/mirroring", json={"enabled": "maybe"}, headers=AUTH).status_code == 422
        on = client.post("/admin/mirroring", json={"enabled": True}, headers=AUTH).json()
        assert on["models"][MODEL]["shadow_state"] == "mirroring"
        ask(client, "/v1/intent", {"text": TEXTS[1]})
        wait_for(lambda: counts()["answered"] == 1, 20, "a mirrored answer")

        # Promotion (v2 becomes @champion) and a new shadow (v1), picked up by a reload without restart: the
        # shadow process loads v1 before the reload answers.
        client_ml.set_registered_model_alias(name, "champion", reg["shadow"])
        client_ml.set_registered_model_alias(name, "shadow", reg["champion"])
        health = client.post("/admin/reload", headers=AUTH).json()["models"][MODEL]
        assert (health["champion"], health["shadow"], health["shadow_state"]) == (reg["shadow"], reg["champion"],
                                                                                 "mirroring")
        promoted = ask(client, "/v1/intent", {"text": TEXTS[2], "request_id": "req-after-promotion"})
        assert promoted["version"] == reg["shadow"]
        wait_for(lambda: counts()["answered"] == 2, 20, "a mirror to the new shadow")

        # @shadow deleted: mirroring stops.
        client_ml.delete_registered_model_alias(name, "shadow")
        assert client.post("/admin/reload", headers=AUTH).json()["models"][MODEL]["shadow"] is None
        ask(client, "/v1/intent", {"text": TEXTS[3]})
        assert counts()["mirrored"] == 2
        assert client.get("/health").json()["models"][MODEL]["shadow_state"] == "no shadow"
    records, _ = read_records(str(reg["log_dir"]), started - timedelta(minutes=1), datetime.now(UTC))
    after = {r.event: r for r in records if r.request_id == "req-after-promotion"}
    assert after["quantized_inference"].model == f"{name}/v{reg['shadow']}"  # the INT8 champion's event
    assert after["shadow_inference"].model == f"{name}/v{reg['champion']}"
    assert len(records) == 4 + 2


def test_only_encoders_are_served(make_config):
    from qat_tasks.serving.service import Service, ServingError

    with pytest.raises(ServingError, match="serves the encoders"):
        Service(make_config(), "fallback-llm")


def test_log_storage_down_keeps_answering_and_admin_stays_closed_without_a_token(intent_registry, tmp_path,
                                                                                 monkeypatch):
    """The log folder cannot be written (a file stands where it should be): requests are still answered, flushes
    fail and are counted, the records wait in memory, and all of them are written once storage is back. Without
    QAT_SERVING_ADMIN_TOKEN the admin routes refuse everyone, a bearer or not."""
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving.service import Service

    monkeypatch.delenv("QAT_SERVING_ADMIN_TOKEN", raising=False)
    blocked = tmp_path / "logs"
    blocked.write_text("not a folder")
    cfg = with_serving(intent_registry["cfg"], log_dir=str(blocked), log_flush_records=4, log_flush_seconds=0.1)
    service = Service(cfg, MODEL, mirror=False)
    started = datetime.now(UTC)
    with running(service, admin_token=None) as client:
        for headers in ({}, AUTH):
            for path, body in (("/admin/mirroring", {"enabled": True}), ("/admin/reload", None)):
                r = client.post(path, json=body, headers=headers)
                assert r.status_code == 503 and "QAT_SERVING_ADMIN_TOKEN" in r.json()["error"], r.text
        assert client.get("/health").json()["mirroring"] is False
        answers = [ask(client, "/v1/intent", {"text": t}) for t in TEXTS]

        log_figure = lambda name: value(scrape(client), name, process="service")  # noqa: E731

        wait_for(lambda: log_figure("qat_log_flush_errors") >= 1, 20, "a failed flush")
        families = scrape(client)
        assert value(families, "qat_requests") == len(TEXTS)
        assert value(families, "qat_log_pending_records", "qat_log_pending_records", process="service") == len(TEXTS)
        assert log_figure("qat_log_records") == 0 and log_figure("qat_log_errors") == 0
        blocked.unlink()  # storage comes back
        wait_for(lambda: log_figure("qat_log_records") == len(TEXTS), 20, "the retried flush")
    records, stats = read_records(str(blocked), started - timedelta(minutes=1), datetime.now(UTC))
    assert sorted(r.request_id for r in records) == sorted(a["request_id"] for a in answers)
    assert stats["invalid"] == 0
