"""The serving component over real HTTP on loopback: champion answers, shadow mirroring that can fail or hang without
touching them, logs in the traffic schema, run-time switches and alias reloads; the offline replay; the log writer."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from qat_tasks.core import storage
from qat_tasks.core.schema import parse_line
from qat_tasks.data.pii import scrub

MODEL = "intent-classifier"
TEXTS = ["where is my order #12345", "do you have One Piece volume 3", "recommend something like Berserk",
         "I want to return a damaged box set", "my card was charged twice", "hello there!",
         "I need to talk to a human right now", "how long does shipping to Canada take"]


@contextlib.contextmanager
def running(service):
    """The real uvicorn server on 127.0.0.1 (ephemeral port) in a thread, and an HTTP client for it; stopping the
    server runs the app's shutdown, which flushes the logs."""
    from qat_tasks.serving.app import make_server

    server, sock, url = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, "server start")
    try:
        with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(15)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metrics(client) -> dict[str, float]:
    """Prometheus text -> {metric name (and quantile): value}."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{")[0] + (f"@{key.split('quantile=')[1][1:-2]}" if "quantile=" in key else "")
            out[name] = float(value)
    return out


def shadow_counts(service) -> Counter:
    return service.mirror.counts.snapshot()


def ask(client, text: str, **extra) -> dict:
    r = client.post("/v1/intent", json={"text": text, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def with_serving(cfg, **changes):
    return cfg.model_copy(update={"serving": cfg.serving.model_copy(update=changes)})


def test_champion_answers_and_both_records_are_logged_in_the_traffic_schema(intent_registry, intent_models):
    from transformers import AutoTokenizer

    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.encoders.modeling import OnnxClassifier, softmax
    from qat_tasks.serving.service import Service

    reg = intent_registry
    direct = OnnxClassifier(intent_models["fp32"], AutoTokenizer.from_pretrained(intent_models["hf"]),
                            intent_models["labels"], intent_models["max_length"]).predict_proba(TEXTS)
    service = Service(reg["cfg"], MODEL)
    started = datetime.now(UTC)
    with running(service) as client:
        health = client.get("/health").json()
        assert (health["champion"], health["shadow"], health["mirroring"]) == (reg["champion"], reg["shadow"], True)
        answers = [ask(client, t, conversation_id="conv-serving-1", turn=i, locale="en-US",
                       **({"request_id": "req-from-client"} if i == 0 else {})) for i, t in enumerate(TEXTS)]
        wait_for(lambda: shadow_counts(service)["answered"] == len(TEXTS), 20, "the shadow's answers")
        m = metrics(client)
    # Every answer is the champion's (v1, FP32): what its ONNX graph computes, with the confidence scaled by the
    # temperature packaged with it (the calibration the offline ECE gate judged).
    scaled = softmax(np.log(direct) / reg["temperature"])
    for a, probs in zip(answers, scaled, strict=True):
        assert (a["model"], a["version"]) == (reg["name"], reg["champion"])
        assert a["intent"] == intent_models["labels"][probs.argmax()]
        assert a["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert answers[0]["request_id"] == "req-from-client" and answers[1]["request_id"].startswith("req-")
    assert m["qat_requests_total"] == len(TEXTS) and m["qat_shadow_answered_total"] == len(TEXTS)
    assert m["qat_shadow_errors_total"] == m["qat_shadow_timeouts_total"] == m["qat_shadow_dropped_total"] == 0
    assert 0 <= m["qat_shadow_agreement"] <= 1 and m["qat_champion_latency_ms@0.95"] > 0

    # The files: immutable flushes in dt= partitions, every line valid in the traffic schema.
    files = sorted(reg["log_dir"].rglob("*"))
    assert files and not [f for f in files if f.name.endswith(".tmp")]
    lines = [line for f in files if f.is_file() for line in f.read_bytes().splitlines()]
    assert len(lines) == 2 * len(TEXTS) and all(parse_line(line)[0] is not None for line in lines)
    assert all(storage._PARTITION.search(str(f)) for f in files if f.is_file())

    # Read back the way the calibration refresh and the review read logs.
    records, stats = read_records(str(reg["log_dir"]), started - timedelta(minutes=1), datetime.now(UTC))
    assert stats["valid"] == 2 * len(TEXTS) and stats["invalid"] == 0
    by_request: dict[str, dict] = {}
    for r in records:
        by_request.setdefault(r.request_id, {})[r.event] = r
    assert len(by_request) == len(TEXTS)
    for a in answers:
        pair = by_request[a["request_id"]]
        assert set(pair) == {"inference", "shadow_inference"}  # champion FP32: "inference"
        champ, shadow = pair["inference"], pair["shadow_inference"]
        assert champ.model == f"{reg['name']}/v{reg['champion']}" and shadow.model == f"{reg['name']}/v{reg['shadow']}"
        assert (champ.intent, champ.confidence) == (a["intent"], round(a["confidence"], 6))
        for field in ("conversation_id", "turn", "text", "timestamp", "locale"):
            assert getattr(champ, field) == getattr(shadow, field)
        assert champ.runtime == shadow.runtime == "onnxruntime" and champ.timestamp.tzinfo is not None
    shadows, _ = read_records(str(reg["log_dir"]), started - timedelta(minutes=1), datetime.now(UTC),
                              events={"shadow_inference"})
    assert len(shadows) == len(TEXTS)


def test_a_failing_or_hanging_shadow_never_affects_the_champion(intent_registry, monkeypatch):
    from qat_tasks.serving import executor
    from qat_tasks.serving.service import Service

    hang_s = 2.0
    service = Service(with_serving(intent_registry["cfg"], shadow_timeout_ms=300.0), MODEL)
    shadow, real_predict = service.shadow, service.shadow.predict
    with running(service) as client:
        baseline = [ask(client, t) for t in TEXTS]
        wait_for(lambda: shadow_counts(service)["answered"] == len(TEXTS), 20, "healthy shadow answers")
        before_by_text = dict(zip(TEXTS, baseline, strict=True))

        def same_as_baseline(texts=TEXTS) -> None:
            for text in texts:
                before = before_by_text[text]
                t0 = time.perf_counter()
                a = ask(client, text)
                assert time.perf_counter() - t0 < hang_s / 2, "a request waited on the shadow"
                assert (a["intent"], a["confidence"], a["version"]) == (before["intent"], before["confidence"],
                                                                        before["version"])

        # An exception in the shadow: counted, the champion's answers unchanged.
        def broken(texts):
            raise RuntimeError("shadow exploded")

        monkeypatch.setattr(shadow, "predict", broken)
        same_as_baseline()
        wait_for(lambda: shadow_counts(service)["errors"] == len(TEXTS), 20, "shadow errors counted")

        # Two calls hang past the deadline: counted as timeouts, and the mirrors after them are answered.
        hangs = iter(range(2))

        def hangs_twice(texts):
            if next(hangs, None) is not None:
                time.sleep(hang_s)
            return real_predict(texts)

        monkeypatch.setattr(shadow, "predict", hangs_twice)
        same_as_baseline()
        wait_for(lambda: shadow_counts(service)["timeouts"] == 2, 20, "two timeouts")
        wait_for(lambda: shadow_counts(service)["answered"] == 2 * len(TEXTS) - 2, 20, "mirroring after the hang")

        # Every call hangs: once the hung threads reach the cap, mirrors are dropped (not queued behind them),
        # /health says so, and mirroring resumes by itself when the hung calls return.
        monkeypatch.setattr(shadow, "predict", lambda texts: time.sleep(hang_s) or real_predict(texts))
        wait_for(lambda: service.mirror.stuck() == 0, 2 * hang_s, "the earlier hung calls to return")
        same_as_baseline(TEXTS * 2)
        cap = executor.MAX_STUCK_CALLS
        wait_for(lambda: shadow_counts(service)["timeouts"] == 2 + cap, 20, "hung calls up to the cap")
        wait_for(lambda: shadow_counts(service)["dropped"] == 2 * len(TEXTS) - cap, 20, "the rest dropped")
        assert client.get("/health").json()["shadow_state"].startswith("stalled")
        monkeypatch.setattr(shadow, "predict", real_predict)
        wait_for(lambda: service.mirror.stuck() == 0, 3 * hang_s, "the hung calls to return")
        answered = shadow_counts(service)["answered"]
        same_as_baseline(TEXTS[:2])
        wait_for(lambda: shadow_counts(service)["answered"] == answered + 2, 20, "mirroring after the stall")
        m = metrics(client)
    c = shadow_counts(service)
    assert m["qat_shadow_mirrored_total"] == c["mirrored"] == c["answered"] + c["errors"] + c["timeouts"] + c["dropped"]
    assert m["qat_requests_total"] == 5 * len(TEXTS) + 2


def test_bad_input_mirroring_switch_and_alias_reload(intent_registry):
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving.service import Service

    reg = intent_registry
    client_ml, name = reg["client"], reg["name"]
    service = Service(reg["cfg"], MODEL)
    started = datetime.now(UTC)
    with running(service) as client:
        # Bad input: a 422 that names the field; nothing answered or logged.
        bad = [({"text": ""}, "text: "), ({"text": "   "}, "text: "), ({"text": "x" * 4001}, "text: "),
               ({}, "text: Field required"), ({"text": "hi", "txt": "typo"}, "txt: unknown field"),
               ({"text": "hi", "turn": -1}, "turn: "), ({"text": "hi", "conversation_id": 7}, "conversation_id: ")]
        for body, problem in bad:
            r = client.post("/v1/intent", json=body)
            assert r.status_code == 422 and r.json()["error"].startswith(problem), (body, r.text)
        r = client.post("/v1/intent", content=b"not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert metrics(client)["qat_requests_total"] == 0

        # Mirroring off at run time: answered, not mirrored; on again: mirrored.
        assert client.post("/admin/mirroring", json={"enabled": False}).json()["mirroring"] is False
        ask(client, TEXTS[0])
        assert shadow_counts(service)["mirrored"] == 0
        assert client.post("/admin/mirroring", json={"enabled": "maybe"}).status_code == 422
        assert client.post("/admin/mirroring", json={"enabled": True}).json()["shadow_state"] == "mirroring"
        ask(client, TEXTS[1])
        wait_for(lambda: shadow_counts(service)["answered"] == 1, 20, "a mirrored answer")

        # Promotion (v2 becomes @champion) and a new shadow (v1), picked up by a reload without restart.
        client_ml.set_registered_model_alias(name, "champion", reg["shadow"])
        client_ml.set_registered_model_alias(name, "shadow", reg["champion"])
        health = client.post("/admin/reload").json()
        assert (health["champion"], health["shadow"]) == (reg["shadow"], reg["champion"])
        promoted = ask(client, TEXTS[2], request_id="req-after-promotion")
        assert promoted["version"] == reg["shadow"]
        wait_for(lambda: shadow_counts(service)["answered"] == 2, 20, "a mirror to the new shadow")

        # @shadow deleted: mirroring stops.
        client_ml.delete_registered_model_alias(name, "shadow")
        assert client.post("/admin/reload").json()["shadow"] is None
        ask(client, TEXTS[3])
        assert shadow_counts(service)["mirrored"] == 2
        assert client.get("/health").json()["shadow_state"] == "no shadow"
    records, _ = read_records(str(reg["log_dir"]), started - timedelta(minutes=1), datetime.now(UTC))
    after = {r.event: r for r in records if r.request_id == "req-after-promotion"}
    assert after["quantized_inference"].model == f"{name}/v{reg['shadow']}"  # the INT8 champion's event
    assert after["shadow_inference"].model == f"{name}/v{reg['champion']}"
    assert len(records) == 4 + 2


def test_replay_sends_logged_traffic_through_both_and_keeps_reviewed_labels(intent_registry, traffic_dir, tmp_path):
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving.replay import replay
    from tests.conftest import WINDOW

    reg = intent_registry
    start, end = (datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (WINDOW[0], WINDOW[0] + timedelta(days=1)))
    logged, stats = read_records(str(traffic_dir), start, end, events={"quantized_inference", "inference"})
    assert stats["invalid"] > 0  # the generated traffic has corrupt lines: counted, not returned
    labelled = [r for r in logged if r.reviewed_label][:15]
    chosen = labelled + [r for r in logged if not r.reviewed_label][:15]
    assert len(labelled) == 15
    result = replay(reg["cfg"], MODEL, chosen, str(tmp_path / "replay"), progress=False)
    assert (result["champion_version"], result["shadow_version"]) == (reg["champion"], reg["shadow"])
    assert result["requests"] == result["answered"] == len(chosen) and result["records"] == 2 * len(chosen)
    out, out_stats = read_records(str(tmp_path / "replay"), start, end)
    assert out_stats["invalid"] == 0 and len(out) == 2 * len(chosen)
    by_id = {r.request_id: r for r in chosen}
    events = Counter(r.event for r in out)
    assert events == {"inference": len(chosen), "shadow_inference": len(chosen)}
    for r in out:
        src = by_id[r.request_id]
        for field in ("conversation_id", "turn", "timestamp", "locale", "reviewed_label"):
            assert getattr(r, field) == getattr(src, field), field
        assert r.text == scrub(src.text)  # logged as the live service logs: scrubbed of personal data
        version = reg["shadow"] if r.event == "shadow_inference" else reg["champion"]
        assert r.model == f"{reg['name']}/v{version}" and r.runtime == "onnxruntime"


def test_only_intent_classifiers_are_served(make_config):
    from qat_tasks.serving.models import ServingError
    from qat_tasks.serving.service import Service

    with pytest.raises(ServingError, match="traffic schema records intents"):
        Service(make_config(), "escalation-detector")


def _record(ts: datetime, **changes) -> dict:
    return {"schema_version": 1, "event": "inference", "request_id": f"req-{ts.timestamp():.0f}",
            "conversation_id": "conv-1", "turn": 0, "timestamp": ts, "model": "m/v1", "runtime": "onnxruntime",
            "text": "where is my order", "intent": "order_status", "confidence": 0.9, "latency_ms": 3.2,
            **changes}


def test_log_writer_partitions_by_day_refuses_invalid_records_and_reader_counts_bad_lines(tmp_path):
    from qat_tasks.data.traffic_log import LogWriter, read_records

    day1 = datetime(2026, 7, 1, 23, 59, 59, tzinfo=UTC)
    writer = LogWriter(str(tmp_path), flush_records=100, flush_seconds=60)
    with pytest.raises(ValueError, match="intent: unknown intent 'refund'"):
        writer.write(_record(day1, intent="refund"))
    with pytest.raises(ValueError, match="timestamp"):
        writer.write(_record(day1.replace(tzinfo=None)))
    for ts in (day1, day1 + timedelta(seconds=2), day1 + timedelta(seconds=3)):
        writer.write(_record(ts))
    writer.close()
    assert writer.stats["records"] == 3 and writer.stats["files"] == 2
    files = sorted(tmp_path.rglob("*.jsonl"))
    assert [f.parent.name for f in files] == ["dt=2026-07-01", "dt=2026-07-02"]
    assert files[0].name.startswith("serving-") and not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(RuntimeError, match="closed"):
        writer.write(_record(day1))

    (tmp_path / "dt=2026-07-02" / "other.jsonl").write_text(
        json.dumps(_record(day1 + timedelta(seconds=5), timestamp="2026-07-02T00:00:05Z")) + "\n{broken\n")
    start = datetime(2026, 7, 1, tzinfo=UTC)
    records, stats = read_records(str(tmp_path), start, datetime(2026, 7, 2, 0, 0, 4, tzinfo=UTC))
    assert len(records) == 3 and stats["invalid"] == 1 and stats["invalid:malformed_json"] == 1
    assert stats["outside_window"] == 1  # 00:00:05 is past the end
    with pytest.raises(ValueError, match="timezone-aware"):
        read_records(str(tmp_path), start.replace(tzinfo=None), datetime(2026, 7, 3, tzinfo=UTC))


def test_log_storage_down_keeps_answering_and_loses_no_record(intent_registry, tmp_path):
    """The log folder cannot be written (a file stands where it should be): requests are still answered, flushes
    fail and are counted, the records wait in memory, and all of them are written once storage is back."""
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.serving.service import Service

    blocked = tmp_path / "logs"
    blocked.write_text("not a folder")
    cfg = with_serving(intent_registry["cfg"], log_dir=str(blocked), log_flush_records=4, log_flush_seconds=0.1)
    service = Service(cfg, MODEL, mirror=False)
    started = datetime.now(UTC)
    with running(service) as client:
        answers = [ask(client, t) for t in TEXTS]
        wait_for(lambda: metrics(client)["qat_log_flush_errors_total"] >= 1, 20, "a failed flush")
        m = metrics(client)
        assert m["qat_requests_total"] == len(TEXTS) and m["qat_log_pending_records"] == len(TEXTS)
        assert m["qat_log_records_total"] == 0 and m["qat_log_errors_total"] == 0
        blocked.unlink()  # storage comes back
        wait_for(lambda: metrics(client)["qat_log_records_total"] == len(TEXTS), 20, "the retried flush")
    records, stats = read_records(str(blocked), started - timedelta(minutes=1), datetime.now(UTC))
    assert sorted(r.request_id for r in records) == sorted(a["request_id"] for a in answers)
    assert stats["invalid"] == 0


def test_log_writer_bounds_its_memory_while_storage_is_down(tmp_path):
    """Past max_buffered the oldest records are dropped, counted, never silently."""
    from qat_tasks.data.traffic_log import LogWriter

    blocked = tmp_path / "logs"
    blocked.write_text("not a folder")
    writer = LogWriter(str(blocked), flush_records=1000, flush_seconds=60, max_buffered=5)
    start = datetime(2026, 7, 1, 12, tzinfo=UTC)
    for i in range(8):
        writer.write(_record(start + timedelta(seconds=i)))
    with pytest.raises(OSError):
        writer.flush()
    assert writer.pending == 5 and writer.stats["dropped"] == 3 and writer.stats["flush_errors"] == 1
    blocked.unlink()
    assert writer.flush() == 5
    writer.close()
    kept = sorted(json.loads(line)["timestamp"] for f in blocked.rglob("*.jsonl") for line in f.read_text().splitlines())
    assert len(kept) == 5 and kept[0].startswith("2026-07-01T12:00:03")  # the newest five
