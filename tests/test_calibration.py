import gzip
import json
import re
from datetime import date
from pathlib import Path

import pytest

from qat_tasks.core import storage
from qat_tasks.core.schema import INTENTS
from qat_tasks.data.calibration_set import (
    EmptyWindowError,
    IntentCoverageError,
    InvalidTrafficError,
    RefreshError,
    load_split,
)
from qat_tasks.data.refresh import allocate, refresh
from qat_tasks.data.sampling import SPLITS, normalize
from qat_tasks.synthetic.generator import generate

from .conftest import WINDOW


@pytest.fixture()
def result(make_config):
    return refresh(make_config(), *WINDOW, progress=False)


def test_counts_and_quarantine(result):
    m = result.manifest
    inp = m["input"]
    assert inp["lines"] == inp["valid"] + inp["invalid"] + inp["blank_lines"]
    assert inp["invalid"] > 0 and sum(inp["invalid_reasons"].values()) == inp["invalid"]
    quarantined = [json.loads(x) for x in gzip.decompress(Path(inp["quarantine"]).read_bytes()).splitlines()]
    assert len(quarantined) == inp["invalid"]  # every invalid line is kept, none silently dropped
    assert all(q["reason"] and q["source"].endswith(".jsonl.gz") and q["line"] >= 1 for q in quarantined)
    assert not any(re.search(r"[\w.+-]+@[\w-]+\.\w+", q["raw"]) for q in quarantined)  # scrubbed evidence
    assert inp["duplicate_requests"] > 0 and inp["duplicate_texts"] > 0
    assert set(inp["pii_scrubbed"]) >= {"EMAIL", "PHONE", "ADDRESS"}


def test_splits_have_no_leakage_and_no_personal_data(result):
    rows = {s: load_split(result.uri, s) for s in SPLITS}
    convs = {s: {r["conversation_id"] for r in rows[s]} for s in SPLITS}
    texts = {s: {normalize(r["text"]) for r in rows[s]} for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not convs[a] & convs[b], f"{a} and {b} share conversations"
                assert not texts[a] & texts[b], f"{a} and {b} share texts"
    everything = json.dumps(rows)
    assert not re.search(r"[\w.+-]+@[\w-]+\.\w{2,}", everything)
    assert not re.search(r"\(\d{3}\) \d{3}-\d{4}", everything)
    assert "MA-" in everything  # order numbers survive scrubbing


def test_evaluation_is_reviewed_and_every_intent_is_stratified(result):
    m = result.manifest
    evaluation = load_split(result.uri, "evaluation")
    assert {r["label_source"] for r in evaluation} == {"reviewed"}
    for split in SPLITS:
        meta = m["splits"][split]
        assert meta["rows"] == sum(meta["per_intent"].values()) <= meta["requested"]
        assert set(meta["per_intent"]) == set(INTENTS), split
        floor = m["settings"]["min_per_intent"]
        assert all(meta["per_intent"][i] >= min(floor, meta["eligible_per_intent"][i]) for i in INTENTS)
    # Rare intents are over-sampled relative to their share of traffic.
    share = m["traffic_intents"]["escalation"] / sum(m["traffic_intents"].values())
    qat = m["splits"]["qat_train"]
    assert qat["per_intent"]["escalation"] / qat["rows"] >= share
    assert set(m["llm_conversations"]["intents_covered"]) == set(INTENTS)
    assert m["llm_conversations"]["conversations"] == 16


def test_edge_cases_are_kept(result):
    kinds = set()
    for split in SPLITS:
        kinds |= set(result.manifest["splits"][split]["edge_cases"])
    assert kinds == {"low_confidence", "long", "non_english"}


def test_same_window_and_seed_give_the_same_version(make_config, result):
    again = refresh(make_config(), *WINDOW, progress=False)
    assert again.version == result.version and again.manifest == result.manifest
    assert result.version.startswith("20260701-20260715-")
    other_seed = refresh(make_config(calibration__seed=99), *WINDOW, progress=False)
    assert other_seed.version != result.version


def test_tampered_split_is_detected(result):
    path = Path(result.split_uri("qat_train"))
    path.write_bytes(storage.gzip_bytes("{}\n"))
    with pytest.raises(RefreshError, match="does not match the sha256"):
        load_split(result.uri, "qat_train")


def test_empty_window_fails_clearly(make_config):
    with pytest.raises(EmptyWindowError, match=r"no traffic logs .* \[2025-01-01, 2025-02-01\)"):
        refresh(make_config(), date(2025, 1, 1), date(2025, 2, 1), progress=False)


def test_missing_source_folder_fails_clearly(make_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        refresh(make_config(traffic=str(tmp_path / "nowhere")), *WINDOW, progress=False)


def _write_lines(root: Path, day: str, lines: list[str], gz: bool = False):
    part = root / f"dt={day}"
    part.mkdir(parents=True, exist_ok=True)
    body = "\n".join(lines) + "\n"
    if gz:
        (part / "traffic-0000.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    else:
        (part / "traffic-0000.jsonl").write_text(body)


def test_invalid_fraction_over_the_limit_fails_and_keeps_evidence(make_config, tmp_path):
    src = tmp_path / "bad"
    generate(str(src), date(2026, 7, 1), date(2026, 7, 3), records_per_day=200, seed=3, corrupt_rate=0.3,
             compress=False)
    cfg = make_config(traffic=str(src), traffic__max_invalid_fraction=0.05)
    with pytest.raises(InvalidTrafficError) as err:
        refresh(cfg, date(2026, 7, 1), date(2026, 7, 3), progress=False)
    msg = str(err.value)
    assert "above the limit of 5.0% (traffic.max_invalid_fraction)" in msg and "malformed_json" in msg
    quarantine = Path(msg.rsplit("Quarantined lines with reasons: ", 1)[1])
    assert quarantine.exists() and len(gzip.decompress(quarantine.read_bytes()).splitlines()) > 50


def test_window_of_only_invalid_lines_is_empty(make_config, tmp_path):
    src = tmp_path / "junk"
    _write_lines(src, "2026-07-01", ["{not json", '{"schema_version": 1}', "[]"])
    with pytest.raises(EmptyWindowError, match="holds no valid record"):
        refresh(make_config(traffic=str(src)), date(2026, 7, 1), date(2026, 7, 2), progress=False)


def test_missing_intent_fails_or_warns_as_configured(make_config, tmp_path):
    src = tmp_path / "no-escalation"
    generate(str(src), date(2026, 7, 1), date(2026, 7, 4), records_per_day=250, seed=5, compress=False)
    for f in src.rglob("*.jsonl"):  # a window in which nobody escalated
        keep = [x for x in f.read_text().splitlines()
                if json.loads(x)["intent"] != "escalation" and json.loads(x)["reviewed_label"] != "escalation"]
        f.write_text("\n".join(keep) + "\n")
    with pytest.raises(IntentCoverageError, match=r"\['escalation'\] have no traffic"):
        refresh(make_config(traffic=str(src)), date(2026, 7, 1), date(2026, 7, 4), progress=False)
    res = refresh(make_config(traffic=str(src), calibration__on_missing_intent="warn"),
                  date(2026, 7, 1), date(2026, 7, 4), progress=False)
    assert any("escalation" in w for w in res.manifest["warnings"])


def test_underrepresented_intent_can_fail(make_config):
    cfg = make_config(calibration__min_per_intent=500, calibration__on_underrepresented_intent="fail")
    with pytest.raises(IntentCoverageError, match="under-represented"):
        refresh(cfg, *WINDOW, progress=False)


def test_allocate_respects_floor_and_total():
    avail = {"a": 1000, "b": 500, "c": 8, "d": 0}
    q = allocate(200, avail, floor=20)
    assert sum(q.values()) == 200 and q["c"] == 8 and q["d"] == 0 and q["a"] > q["b"] > 20
    assert allocate(2000, avail, floor=20) == avail


def test_refresh_from_s3_gzip_and_plain(make_config, s3_endpoint):
    from qat_tasks.core.storage import s3_client

    s3_client(s3_endpoint).create_bucket(Bucket="logs")
    window = (date(2026, 7, 1), date(2026, 7, 3))
    generate("s3://logs/inference", *window, records_per_day=150, seed=2, endpoint_url=s3_endpoint)
    generate("s3://logs/plain", *window, records_per_day=150, seed=2, compress=False, endpoint_url=s3_endpoint)
    lenient = dict(calibration__on_underrepresented_intent="warn", calibration__min_per_intent=1,
                   calibration__on_missing_intent="warn", traffic__s3_endpoint_url=s3_endpoint)
    a = refresh(make_config(traffic="s3://logs/inference", **lenient), *window, progress=False)
    b = refresh(make_config(traffic="s3://logs/plain", **lenient), *window, progress=False)
    assert a.manifest["input"]["lines"] == b.manifest["input"]["lines"] > 250
    assert a.version == b.version  # same content, whatever the encoding
    assert a.manifest["source"] == "s3://logs/inference"
    out = make_config(traffic="s3://logs/inference", calibration__output="s3://logs/calibration", **lenient)
    c = refresh(out, *window, progress=False)
    assert c.uri == f"s3://logs/calibration/{c.version}" and c.version == a.version
    assert len(load_split(c.uri, "qat_train", s3_endpoint)) == c.manifest["splits"]["qat_train"]["rows"]


def test_a_failed_refresh_can_be_rerun_after_fixing_the_config(make_config, tmp_path, monkeypatch):
    """The failed attempt stays in MLflow as evidence; the rerun of the same DAG run gets its own run."""
    from mlflow import MlflowClient

    from qat_tasks.core.tracking import RunContext
    from qat_tasks.data.refresh_run import refresh_tracked

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    src = tmp_path / "noisy"
    generate(str(src), date(2026, 7, 1), date(2026, 7, 4), records_per_day=250, seed=8, corrupt_rate=0.06)
    ctx = RunContext("quarterly_recalibration", "manual__rerun", "rerun test", "manual")
    strict = make_config(traffic=str(src), traffic__max_invalid_fraction=0.01)
    with pytest.raises(InvalidTrafficError):
        refresh_tracked(strict, date(2026, 7, 1), date(2026, 7, 4), ctx, progress=False)
    lenient = make_config(traffic=str(src), traffic__max_invalid_fraction=0.10)
    first = refresh_tracked(lenient, date(2026, 7, 1), date(2026, 7, 4), ctx, progress=False)
    again = refresh_tracked(lenient, date(2026, 7, 1), date(2026, 7, 4), ctx, progress=False)
    assert again == first
    client = MlflowClient()
    exp = client.get_experiment_by_name("mangaassist-calibration")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]
    assert "above the limit" in runs[0].data.tags["error"]
    assert runs[1].data.tags["qat.previous_attempt"] == runs[0].info.run_id
    assert runs[1].data.params["max_invalid_fraction"] == "0.1"


def _sets(uri: str) -> dict[str, list[dict]]:
    """Every set a calibration version holds, as rows with conversation id and text (the LLM's as turns)."""
    out = {s: load_split(uri, s) for s in SPLITS}
    out["llm_calibration"] = [{"conversation_id": c["conversation_id"], "text": t["text"]}
                              for c in load_split(uri, "llm_conversations") for t in c["turns"]]
    return out


def _overlaps(sets: dict[str, list[dict]]) -> dict[str, int]:
    found = {}
    names = sorted(sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for key, norm in (("conversation_id", str), ("text", normalize)):
                shared = {norm(r[key]) for r in sets[a]} & {norm(r[key]) for r in sets[b]}
                if shared:
                    found[f"{a}/{b} {key}"] = len(shared)
    return found


def test_no_conversation_and_no_text_sits_in_two_sets_even_when_traffic_collides(make_config, tmp_path):
    """The same texts in many conversations of every split, and review labels on turns of each split: still no
    text and no conversation in two sets, the LLM's calibration conversations included."""
    from qat_tasks.data.labels import import_labels

    phrases = [f"where is my order of {t} volume {v}" for t in ("Berserk", "Frieren", "Monster") for v in range(1, 11)]
    day = tmp_path / "traffic" / "dt=2026-07-02"
    day.mkdir(parents=True)
    lines, labels = [], ["request_id,reviewed_label,reviewer,reviewed_at"]
    for c in range(900):
        for turn in range(3):
            rid = f"req-{c}-{turn}"
            text = phrases[(c * 7 + turn) % len(phrases)] if turn < 2 else f"thanks, that was message {c}"
            intent = INTENTS[c % len(INTENTS)]
            lines.append(json.dumps({"schema_version": 1, "event": "inference", "request_id": rid,
                                     "conversation_id": f"conv-{c}", "turn": turn,
                                     "timestamp": f"2026-07-02T{turn:02d}:00:00Z", "model": "m", "runtime": "onnxruntime",
                                     "text": text, "intent": intent, "confidence": 0.9, "latency_ms": 5.0,
                                     "reviewed_label": intent if c % 3 == 0 else None}))
            if c % 3 == 1:
                labels.append(f"{rid},{intent},annotator-1,2026-07-03T00:00:00Z")
    (day / "collide.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    import_labels(tmp_path / "labels.csv", str(tmp_path / "traffic"))
    cfg = make_config(traffic=str(tmp_path / "traffic"), **{"calibration__on_missing_intent": "warn",
                                                           "calibration__on_underrepresented_intent": "warn"})
    result = refresh(cfg, date(2026, 7, 1), date(2026, 7, 5), progress=False)
    sets = _sets(result.uri)
    assert all(sets[s] for s in sets), {s: len(v) for s, v in sets.items()}
    assert _overlaps(sets) == {}
    print("\ncolliding traffic:", {s: len(v) for s, v in sets.items()}, "rows; overlaps", _overlaps(sets),
          {k: result.manifest["input"][k] for k in ("duplicate_texts", "llm_turns_held_elsewhere",
                                                    "calibration_rows_left_to_llm")})
    assert result.manifest["labels"]["joined"] > 0 and result.manifest["input"]["llm_turns_held_elsewhere"] > 0
    assert result.manifest["input"]["calibration_rows_left_to_llm"] > 0


def test_a_small_calibration_split_is_shared_half_and_half_between_the_two_calibration_sets(make_config, tmp_path):
    from qat_tasks.data.sampling import splitter

    cfg = make_config(traffic=str(tmp_path / "traffic"), **{"calibration__on_missing_intent": "warn",
                                                           "calibration__on_underrepresented_intent": "warn"})
    split_of = splitter(cfg)
    ids = [c for c in (f"conv-{i}" for i in range(400)) if split_of(c) == "calibration"][:6]
    day = tmp_path / "traffic" / "dt=2026-07-02"
    day.mkdir(parents=True)
    day.joinpath("small.jsonl").write_text("".join(json.dumps({
        "schema_version": 2, "event": "inference", "request_id": f"req-{c}-{t}", "conversation_id": c, "turn": t,
        "timestamp": f"2026-07-02T0{t}:00:00Z", "model": "m", "runtime": "onnxruntime",
        "text": f"message {t} of {c}", "intent": INTENTS[t], "confidence": 0.9, "latency_ms": 5.0}) + "\n"
        for c in ids for t in range(2)))
    result = refresh(cfg, date(2026, 7, 1), date(2026, 7, 5), progress=False)
    m = result.manifest
    assert cfg.calibration.llm_conversations > 3
    assert m["llm_conversations"]["conversations"] == 3 and m["splits"]["calibration"]["rows"] == 6
    assert any("3 of the calibration split's 6 conversations go to the LLM" in w for w in m["warnings"])
    assert _overlaps(_sets(result.uri)) == {}


def test_the_bundled_sample_gives_disjoint_sets(make_config):
    from qat_tasks.core.config import PROJECT_ROOT

    cfg = make_config(traffic=str(PROJECT_ROOT / "data" / "traffic_sample"))
    result = refresh(cfg, date(2026, 7, 1), date(2026, 10, 1), progress=False)
    sets = _sets(result.uri)
    assert _overlaps(sets) == {}
    print("\nbundled sample:", {s: len(v) for s, v in sets.items()}, "rows; overlaps", _overlaps(sets),
          {k: result.manifest["input"][k] for k in ("duplicate_texts", "llm_turns_held_elsewhere",
                                                    "calibration_rows_left_to_llm")})
