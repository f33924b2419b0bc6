"""The serving component over real HTTP on loopback: uvicorn in a thread, ONNX Runtime sessions of the fixture's
registered versions (v1 FP32 @champion, v2 INT8 @shadow), logs read back in the traffic schema."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from qat_tasks.schema import parse_line
from qat_tasks.traffic_log import read_records

TEXTS = ["where is my order MA-2026-104233", "do you have one piece volume 104", "i want a refund for vol 3",
         "my card was charged twice", "recommend something like frieren", "hi there"]


@pytest.fixture()
def service(intent_registry):
    import uvicorn

    from qat_tasks.serving import Service, create_app

    svc = Service(intent_registry["cfg"], "intent-classifier")
    server = uvicorn.Server(uvicorn.Config(create_app(svc), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield svc, client, intent_registry
    server.should_exit = True
    thread.join(timeout=10)


def _logged(reg):
    svc_end = datetime.now(UTC) + timedelta(minutes=1)
    records, stats = read_records(str(reg["log_dir"]), svc_end - timedelta(days=1), svc_end)
    return records, stats


def _wait_mirrors(svc, n: int, timeout: float = 10.0) -> None:
    t0 = time.time()
    m = svc.mirror.stats
    while m["answered"] + m["errors"] + m["timeouts"] + m["dropped"] < n and time.time() - t0 < timeout:
        time.sleep(0.02)


def test_champion_answers_and_both_answers_are_logged_in_the_traffic_schema(service):
    svc, client, reg = service
    answers = []
    for i, text in enumerate(TEXTS):
        r = client.post("/v1/intent", json={"text": text, "conversation_id": "conv-a", "turn": i})
        assert r.status_code == 200
        answers.append(r.json())
    assert {a["version"] for a in answers} == {reg["champion"]}
    # What the champion says over HTTP is what it says in process.
    assert [a["intent"] for a in answers] == [i for i, _ in svc.champion.predict(TEXTS)]
    _wait_mirrors(svc, len(TEXTS))
    svc.writer.flush()
    records, stats = _logged(reg)
    assert stats.get("invalid", 0) == 0
    by_event = {e: [r for r in records if r.event == e] for e in ("inference", "shadow_inference")}
    assert len(by_event["inference"]) == len(TEXTS) == len(by_event["shadow_inference"])
    assert {r.model for r in by_event["shadow_inference"]} == {f"{reg['name']}/v{reg['shadow']}"}
    assert {r.request_id for r in by_event["inference"]} == {r.request_id for r in by_event["shadow_inference"]}
    for path in reg["log_dir"].rglob("*.jsonl"):  # every line would pass the refresh's validation
        assert all(parse_line(line)[0] is not None for line in path.read_text().splitlines())
    metrics = client.get("/metrics").text
    assert f'qat_requests_total{{model="{reg["name"]}"}} {len(TEXTS)}' in metrics
    assert "qat_shadow_answered_total" in metrics


def test_a_failing_shadow_never_touches_the_champions_answers(service):
    svc, client, _ = service
    expected = [client.post("/v1/intent", json={"text": t}).json()["intent"] for t in TEXTS]
    _wait_mirrors(svc, len(TEXTS))

    def boom(texts):
        raise RuntimeError("injected shadow failure")

    svc.shadow.predict = boom
    got = [client.post("/v1/intent", json={"text": t}) for t in TEXTS]
    assert [r.status_code for r in got] == [200] * len(TEXTS)
    assert [r.json()["intent"] for r in got] == expected
    _wait_mirrors(svc, 2 * len(TEXTS))
    assert svc.mirror.stats["errors"] == len(TEXTS)


def test_a_hung_shadow_is_timed_out_and_mirroring_goes_on(service):
    svc, client, _ = service
    real = svc.shadow.predict
    hang = threading.Event()

    def hung(texts):
        if not hang.is_set():
            hang.wait(30)  # far past serving.shadow_timeout_ms
        return real(texts)

    svc.shadow.predict = hung
    t0 = time.perf_counter()
    responses = [client.post("/v1/intent", json={"text": t}) for t in TEXTS[:3]]
    elapsed = time.perf_counter() - t0
    assert all(r.status_code == 200 for r in responses)
    assert elapsed < 5, f"the champion waited for the shadow: {elapsed:.1f} s for 3 requests"
    _wait_mirrors(svc, 3)
    assert svc.mirror.stats["timeouts"] == 3
    hang.set()  # the shadow recovers: later mirrors are answered again
    client.post("/v1/intent", json={"text": TEXTS[3]})
    _wait_mirrors(svc, 4)
    assert svc.mirror.stats["answered"] == 1


@pytest.mark.parametrize("body,field", [({"text": ""}, "text"), ({"text": "   "}, "text"),
                                        ({"text": "hi", "txt": "x"}, "txt"), ({"txt": "hi"}, "text"),
                                        ({"text": "x" * 4001}, "text"), ({"text": "hi", "turn": -1}, "turn")])
def test_bad_input_is_a_422_naming_the_field(service, body, field):
    _, client, _ = service
    r = client.post("/v1/intent", json=body)
    assert r.status_code == 422
    assert field in {str(part) for err in r.json()["detail"] for part in err["loc"]}


def test_mirroring_switch_and_alias_reload(service):
    svc, client, reg = service
    assert client.post("/admin/mirroring", json={"enabled": False}).json()["mirroring"] is False
    client.post("/v1/intent", json={"text": "hello"})
    assert svc.mirror.stats["mirrored"] == 0
    # A promotion moves the aliases in the registry; the service follows them without a restart.
    reg["client"].set_registered_model_alias(reg["name"], "champion", reg["shadow"])
    reg["client"].delete_registered_model_alias(reg["name"], "shadow")
    health = client.post("/admin/reload").json()
    assert health["champion"] == reg["shadow"] and health["shadow"] is None
    assert client.post("/v1/intent", json={"text": "hello"}).json()["version"] == reg["shadow"]


def test_replay_keeps_ids_and_reviewed_labels(intent_registry, tmp_path):
    from qat_tasks.serving import replay
    from qat_tasks.traffic import TrafficGenerator

    gen = TrafficGenerator(seed=3)
    from qat_tasks.schema import InferenceRecord

    records = [InferenceRecord.model_validate_json(line)
               for line in gen.day_lines(datetime(2026, 7, 2).date(), 40)][:40]
    out = replay(intent_registry["cfg"], "intent-classifier", records, str(tmp_path / "replay"), progress=False)
    assert out["requests"] == len(records)
    replayed, _ = read_records(str(tmp_path / "replay"), datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    champ = {r.request_id: r for r in replayed if r.event != "shadow_inference"}
    assert set(champ) == {r.request_id for r in records}
    assert all(champ[r.request_id].reviewed_label == r.reviewed_label for r in records)
    assert sum(r.event == "shadow_inference" for r in replayed) == len(records)
