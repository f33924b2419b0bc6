"""Reviewed labels flow back from people: a labelling tool's export is imported as review-label records, the
refresh joins them to the logged turns (the latest review wins; late, conflicting and orphaned labels are
counted), and on the service's own logs, which carry no labels, the import is what lets the refresh and the
live shadow review reach a decision."""

from __future__ import annotations

import gzip
import json
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from qat_tasks.core.schema import INTENTS, parse_line
from qat_tasks.data.labels import import_labels, read_labels

from .conftest import WINDOW


def write_csv(path: Path, rows: list[tuple]) -> Path:
    path.write_text("request_id,reviewed_label,reviewer,reviewed_at\n" + "".join(",".join(map(str, r)) + "\n"
                                                                               for r in rows))
    return path


def test_import_validates_rows_writes_review_records_and_quarantines_the_rest(tmp_path):
    export = tmp_path / "export.csv"
    export.write_text("request_id,reviewed_label,reviewer,reviewed_at\n"
                      "req-1,escalation,annotator-3,2026-10-03T10:00:00Z\n"
                      "req-2,order_status,jane.doe@example.com,2026-10-04T09:30:00+02:00\n"
                      "req-3,not_an_intent,annotator-3,2026-10-03T10:00:00Z\n"
                      "req-4,chitchat,annotator-3,2026-10-03 10:00:00\n"
                      ",chitchat,annotator-3,2026-10-03T10:00:00Z\n"
                      "req-6,chitchat,annotator-3,2026-10-03T10:00:00Z,extra\n")
    store = tmp_path / "store"
    result = import_labels(export, str(store))
    assert (result["rows"], result["written"], result["invalid"]) == (6, 2, 4)
    reasons = [json.loads(line)["reason"] for line in Path(result["quarantine"]).read_text().splitlines()]
    assert any("unknown intent 'not_an_intent'" in r for r in reasons)
    assert any(r.startswith("reviewed_at:") and "has no timezone" in r for r in reasons)
    assert any(r.startswith("request_id:") for r in reasons)
    assert any("beyond the header" in r for r in reasons)
    # One labels-* file per reviewed day (UTC), in the traffic store's partitions
    files = sorted(store.glob("dt=*/labels-*.jsonl"))
    assert [f.parent.name for f in files] == ["dt=2026-10-03", "dt=2026-10-04"]
    labels, invalid = read_labels([str(store)], date(2026, 10, 1), date(2026, 10, 10))
    assert invalid == [] and set(labels.latest) == {"req-1", "req-2"}
    assert labels.get("req-2").reviewer == "[EMAIL]"  # who reviewed is kept, their address is not
    assert "jane.doe" not in "".join(f.read_text() for f in files)
    # JSONL exports work the same (`label` is accepted for `reviewed_label`)
    jsonl = tmp_path / "export.jsonl"
    jsonl.write_text(json.dumps({"request_id": "req-7", "label": "chitchat", "reviewer": "tool:v2",
                                 "reviewed_at": "2026-10-05T00:00:00Z"}) + "\nnot json\n")
    assert import_labels(jsonl, str(store))["written"] == 1


def _strip_labels(src: Path, dst: Path) -> dict[str, tuple[str, str, str]]:
    """A copy of generated traffic as the serving component logs it (no reviewed labels); returns the labels that
    were taken out: request id -> (reviewed label, conversation id, day)."""
    taken = {}
    for f in sorted(src.rglob("*.jsonl*")):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        raw = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        lines = []
        for line in raw.decode().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                lines.append(line)
                continue
            if isinstance(rec, dict) and rec.get("reviewed_label") and parse_line(line)[0] is not None:
                taken.setdefault(rec["request_id"], (rec["reviewed_label"], rec["conversation_id"], rec["timestamp"][:10]))
                rec["reviewed_label"] = None
            lines.append(json.dumps(rec))
        body = ("\n".join(lines) + "\n").encode()
        out.write_bytes(gzip.compress(body) if f.suffix == ".gz" else body)
    return taken


def test_refresh_joins_labels_latest_wins_late_conflicting_and_orphaned_are_counted(traffic_dir, make_config, tmp_path):
    from qat_tasks.data.calibration_set import IntentCoverageError, load_split
    from qat_tasks.data.refresh import refresh

    logs = tmp_path / "service-logs"
    taken = _strip_labels(traffic_dir, logs)
    cfg = make_config(traffic=str(logs), **{"calibration__on_underrepresented_intent": "fail", "calibration__min_per_intent": 1})
    # The service's own logs carry no labels: the evaluation split (reviewed turns only) cannot be filled.
    with pytest.raises(IntentCoverageError, match=r"0 review label\(s\) joined.*import-labels"):
        refresh(cfg, *WINDOW, progress=False)

    start, end = WINDOW
    ids = sorted(taken)
    on_time = [(rid, taken[rid][0], "annotator-1", f"{taken[rid][2]}T23:00:00Z") for rid in ids[:-40]]
    late = [(rid, taken[rid][0], "annotator-2", f"{end + timedelta(days=3)}T09:00:00Z") for rid in ids[-40:-10]]
    beyond = [(rid, taken[rid][0], "annotator-2", f"{end + timedelta(days=30)}T09:00:00Z") for rid in ids[-10:]]
    conflict_id = ids[0]
    wrong = next(i for i in INTENTS if i != taken[conflict_id][0])
    # A first review said `wrong`; the later one corrects it.
    conflict = [(conflict_id, wrong, "annotator-9", f"{start}T00:00:01Z")]
    orphans = [(f"req-not-logged-{i}", "chitchat", "annotator-1", f"{start}T12:00:00Z") for i in range(5)]
    result = import_labels(write_csv(tmp_path / "labels.csv", on_time + late + beyond + conflict + orphans), str(logs))
    assert result["invalid"] == 0

    cal = refresh(cfg.model_copy(update={"calibration": cfg.calibration.model_copy(
        update={"on_underrepresented_intent": "warn"})}), *WINDOW, progress=False)
    report = cal.manifest["labels"]
    in_window = len(on_time) + len(late)
    assert report["joined"] == in_window  # the 10 reviewed past the look-ahead are not read
    assert report["late"] == len(late)
    assert report["conflicting"] == 1
    assert report["orphaned"] == len(orphans)
    assert report["records"] == in_window + len(conflict) + len(orphans)
    assert report["lookahead_days"] == cfg.calibration.label_lookahead_days
    evaluation = load_split(cal.uri, "evaluation")
    assert evaluation and all(r["label_source"] == "reviewed" for r in evaluation)
    assert all(r["label"] == taken[r["request_id"]][0] for r in evaluation)  # the labels people gave
    rows = {r["request_id"]: r for s in ("calibration", "qat_train", "evaluation") for r in load_split(cal.uri, s)}
    print(f"\nlabel join: {len(taken)} labels taken out of the logs, {result['written']} imported; joined "
          f"{report['joined']}, late {report['late']}, conflicting {report['conflicting']}, orphaned "
          f"{report['orphaned']} ({len(beyond)} reviewed past the {report['lookahead_days']}-day look-ahead not read)")
    if conflict_id in rows:
        assert rows[conflict_id]["label"] == taken[conflict_id][0]  # the latest review wins


def test_label_loop_on_the_service_own_logs_reaches_a_refresh_and_a_live_review(intent_registry, traffic_dir,
                                                                                  tmp_path):
    """The service logs turns with no labels; people review some of them; the import lets the refresh fill its
    evaluation split and the live shadow review decide, where without it neither could."""
    from qat_tasks.data.calibration_set import IntentCoverageError, load_split
    from qat_tasks.data.refresh import refresh
    from qat_tasks.data.traffic_log import read_records
    from qat_tasks.promotion import shadow
    from qat_tasks.serving.app import IntentRequest
    from qat_tasks.serving.service import Service

    reg = intent_registry
    base = reg["cfg"]
    log_dir = str(reg["log_dir"])
    cfg = base.model_copy(update={
        "traffic": base.traffic.model_copy(update={"source": log_dir}),
        "calibration": base.calibration.model_copy(update={"on_missing_intent": "warn",
                                                           "on_underrepresented_intent": "fail",
                                                           "min_per_intent": 1}),
        "shadow": base.shadow.model_copy(update={"min_reviewed_labels": 40, "min_mirrored_requests": 50,
                                                 "live_window_hours": 1.0})})
    generated, _ = read_records(str(traffic_dir), datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 7, 3, tzinfo=UTC))
    turns = [r for r in generated if r.event != "shadow_inference"][:160]
    truth = {}
    service = Service(cfg, "intent-classifier")
    try:
        for i, r in enumerate(turns):
            answer = service.answer(IntentRequest(text=r.text, conversation_id=r.conversation_id, turn=r.turn,
                                                  request_id=f"live-{i}"))
            truth[answer["request_id"]] = r.reviewed_label or r.intent
        deadline = time.monotonic() + 60
        while service.mirror.counts.snapshot()["answered"] < len(turns) and time.monotonic() < deadline:
            time.sleep(0.2)  # the shadow answers the mirrors in the background
    finally:
        service.close()
    now = datetime.now(UTC)
    logged, _ = read_records(log_dir, now - timedelta(hours=1), now + timedelta(minutes=1))
    assert logged and all(r.reviewed_label is None for r in logged)  # nobody's labels are in the service's logs
    today, tomorrow = now.date(), now.date() + timedelta(days=1)
    with pytest.raises(IntentCoverageError, match=r"0 review label\(s\) joined"):
        refresh(cfg, today, tomorrow, progress=False)
    before = shadow.review_live(cfg, "intent-classifier", _ctx("live-1"), now=now + timedelta(hours=2))
    assert before["outcome"] == "insufficient_evidence"

    reviewed_at = (now + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    rows = [(rid, label, "annotator-1", reviewed_at) for rid, label in sorted(truth.items())]
    assert import_labels(write_csv(tmp_path / "reviews.csv", rows), log_dir)["written"] == len(rows)
    relaxed = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(
        update={"on_underrepresented_intent": "warn"})})
    cal = refresh(relaxed, today, tomorrow, progress=False)
    assert cal.manifest["labels"]["joined"] == len(truth) and cal.manifest["labels"]["orphaned"] == 0
    evaluation = load_split(cal.uri, "evaluation")
    assert evaluation and all(r["label_source"] == "reviewed" for r in evaluation)
    after = shadow.review_live(cfg, "intent-classifier", _ctx("live-2"), now=now + timedelta(hours=2))
    assert after["outcome"] in ("passed", "failed") and after["labels_joined"] == len(truth)
    report = cal.manifest["labels"]
    print(f"\nlabel loop: {sum(r.event != 'shadow_inference' for r in logged)} turns logged by the service "
          f"(+{sum(r.event == 'shadow_inference' for r in logged)} shadow answers), none labelled; without labels: "
          f"refresh failed (0 joined), live review {before['outcome']}; {len(rows)} labels imported; refresh: "
          f"joined {report['joined']}, late {report['late']}, conflicting {report['conflicting']}, orphaned "
          f"{report['orphaned']}, evaluation rows {len(evaluation)}; live review: {after['outcome']} "
          f"({after['labels_joined']} labels joined)")


def _ctx(run_id: str):
    from qat_tasks.core.tracking import RunContext

    return RunContext(dag_id="shadow_review", run_id=run_id, reason="test: label loop", trigger="test")
