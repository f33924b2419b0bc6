"""The drift monitor: PSI/KS arithmetic, the calibration-time reference, the verdict on an undrifted and a
drifted day of generated traffic, and the daily DAG triggering the recalibration only when something drifted."""

import tempfile
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from .conftest import WINDOW

ROOT = Path(__file__).resolve().parent.parent
STABLE_DAY = date(2026, 11, 20)
DRIFT_DAY = date(2026, 11, 21)
NEXT = timedelta(days=1)


def test_psi_and_ks_on_known_distributions():
    from qat_tasks.monitoring.distances import ks, psi, psi_categorical

    rng = np.random.default_rng(0)
    ref, same, shifted = rng.normal(0, 1, 5000), rng.normal(0, 1, 5000), rng.normal(1, 1, 5000)
    assert psi(ref, ref) == pytest.approx(0.0, abs=1e-12) and ks(ref, ref) == 0.0
    # Two samples of one distribution: PSI ~ (bins - 1) * (1/n + 1/m), KS ~ 1/sqrt(n)
    assert psi(ref, same) < 0.02 and ks(ref, same) < 0.04
    # A one-sigma shift: PSI approaches the J-divergence (mu^2 = 1) as bins get finer; KS = 2 Phi(0.5) - 1 = 0.383
    assert 0.7 < psi(ref, shifted) < 1.0 and psi(ref, shifted, bins=50) > psi(ref, shifted)
    assert ks(ref, shifted) == pytest.approx(0.383, abs=0.03)
    # Categories: 6 % -> 35 % non-English is PSI (0.29 ln 5.83 + 0.29 ln(0.94/0.65)) = 0.62
    assert psi_categorical(["yes"] * 600 + ["no"] * 9400, ["yes"] * 350 + ["no"] * 650) == pytest.approx(0.618, abs=0.01)
    assert psi_categorical(list("aabbc"), list("aabbc")) == 0.0
    # A category unseen in the reference counts, finite thanks to the half-count smoothing
    assert 0.25 < psi_categorical(["a"] * 50 + ["b"] * 50, ["a"] * 45 + ["b"] * 45 + ["new"] * 10) < 0.5
    # ... which also keeps a rare intent missing from one small day from reading as drift (1e-4 gave 0.17 alone)
    ref_intents = ["escalation"] * 30 + ["other"] * 970
    assert psi_categorical(ref_intents, ["other"] * 300) < 0.1
    # A mass point (most messages have no [UNK]) merges tied bins instead of splitting zeros at random
    zeros = np.r_[np.zeros(900), rng.uniform(0, 0.2, 100)]
    assert psi(zeros, np.r_[np.zeros(880), rng.uniform(0, 0.2, 120)]) < 0.05
    assert psi(zeros, np.r_[np.zeros(500), rng.uniform(0, 0.2, 500)]) > 0.5


def test_unknown_drift_profile_is_named():
    from qat_tasks.synthetic.generator import TrafficGenerator

    with pytest.raises(ValueError, match="catalogue_launch"):
        TrafficGenerator(drift="black_friday")


@pytest.fixture()
def monitored(intent_registry):
    """The fixture's FP32 champion with a real calibration version (refreshed from the session's traffic), an
    undrifted day and a catalogue-launch day of traffic in the service's log folder."""
    from qat_tasks.data.refresh import refresh
    from qat_tasks.synthetic.generator import generate

    cfg = intent_registry["cfg"]
    cal = refresh(cfg, *WINDOW, progress=False)
    intent_registry["client"].set_model_version_tag(intent_registry["name"], intent_registry["champion"],
                                                    "calibration_version", cal.version)
    log_dir = str(intent_registry["log_dir"])
    generate(log_dir, STABLE_DAY, STABLE_DAY + NEXT, records_per_day=320, seed=23, corrupt_rate=0.005)
    generate(log_dir, DRIFT_DAY, DRIFT_DAY + NEXT, records_per_day=320, seed=29, drift="catalogue_launch")
    return {**intent_registry, "calibration": cal}


def test_reference_is_stored_at_calibration_time_and_read_back(monitored, monkeypatch):
    from qat_tasks import pipeline
    from qat_tasks.core import storage, tracking
    from qat_tasks.monitoring import reference, statistics

    cfg, cal = monitored["cfg"], monitored["calibration"]
    # The quarterly run's champion evaluation stores it and names it on its MLflow run
    ctx = tracking.RunContext("quarterly_recalibration", "test-eval", "test: reference", "test")
    champion = {"model": "intent-classifier", "registered_model": monitored["name"], "version": monitored["champion"],
                "parent_run_id": tracking.model_parent_run(cfg, "intent-classifier", ctx, cal.version)}
    run = {"ctx": ctx.to_dict(), "window": {}, "models": ["intent-classifier"]}
    evaluation = pipeline.evaluate_stage(cfg, run, {"uri": cal.uri, "version": cal.version}, champion)
    ref = reference.load_reference(cfg, "intent-classifier", cal.version)
    assert monitored["client"].get_run(evaluation["run_id"]).data.tags["drift.reference"] == ref["uri"]
    assert ref["uri"] == storage.join(cfg.calibration_store, "drift-reference", "intent-classifier",
                                      f"{cal.version}.json")
    assert Path(ref["uri"]).is_file() and ref["calibration_version"] == cal.version
    # Drawn from the calibration window's traffic, as the live window is read, not from the stratified splits
    assert ref["source"]["kind"] == "traffic" and ref["rows"] == cfg.drift.reference_rows
    assert set(ref["layers"]) == {"embeddings.LayerNorm", "layer.0.attention.output.LayerNorm",
                                  "layer.0.intermediate.act", "layer.0.output.LayerNorm",
                                  "layer.1.attention.output.LayerNorm", "layer.1.intermediate.act",
                                  "layer.1.output.LayerNorm"}
    gelu = ref["layers"]["layer.0.intermediate.act"]
    assert gelu["min"] >= -0.2 and gelu["min"] <= gelu["p0.1"] <= gelu["p50"] <= gelu["p99.9"] <= gelu["max"]
    feats = ref["features"]
    assert {f["group"] for f in feats.values()} == {"activations", "inputs", "predictions"}
    assert len(feats["layer.1.output.LayerNorm.absmax"]["values"]) == ref["rows"]
    assert len(feats["chars"]["edges"]) <= cfg.drift.bins - 1 and "edges" not in feats["predicted_label"]
    assert 0.02 < feats["non_english"]["values"].count("yes") / ref["rows"] < 0.12
    # Stored once: a retried evaluation reads it back instead of recomputing
    monkeypatch.setattr(statistics, "text_statistics", lambda *a, **k: pytest.fail("recomputed an existing reference"))
    again = reference.store_reference(cfg, "intent-classifier", monitored["champion"], cal.uri)
    assert again == reference.load_reference(cfg, "intent-classifier", cal.version) == ref
    # An INT8 version carries the FP32 folder it was quantized from: same weights, same reference
    with tempfile.TemporaryDirectory() as tmp:
        int8 = reference._download(cfg, "intent-classifier", monitored["shadow"], Path(tmp))
        assert reference._reference_for(cfg, "intent-classifier", int8, cal.version)["uri"] == ref["uri"]
        # Other weights get a reference of their own: their activations are not comparable with these
        monkeypatch.undo()
        other = reference._reference_for(cfg, "intent-classifier", {**int8, "digest": "0" * 64}, cal.version)
    assert other["uri"].endswith(f"{cal.version}.000000000000.json") and other["weights_sha256"] == "0" * 64


def test_monitor_stays_quiet_on_an_undrifted_day_and_flags_a_catalogue_launch(monitored):
    import mlflow

    from qat_tasks.core.tracking import RunContext
    from qat_tasks.monitoring import drift, reference

    cfg, client = monitored["cfg"], monitored["client"]
    ctx = RunContext("drift_monitor", "test-stable", "test: undrifted day", "test")
    # No reference yet (the champion predates the monitor): the monitor computes and stores it itself
    assert reference.load_reference(cfg, "intent-classifier", monitored["calibration"].version) is None
    stable = drift.monitor(cfg, STABLE_DAY, STABLE_DAY + NEXT, ctx)
    ic = stable["models"]["intent-classifier"]
    assert ic["verdict"] == "stable" and stable["drifted"] == [] and stable["reason"] is None
    assert ic["drift_score"] < cfg.drift.psi_threshold and stable["invalid_lines"] > 0
    assert stable["models"]["escalation-detector"]["verdict"] == "skipped"  # no champion registered
    assert reference.load_reference(cfg, "intent-classifier", monitored["calibration"].version) is not None
    assert drift.monitor(cfg, STABLE_DAY, STABLE_DAY + NEXT, ctx) == stable  # a retry logs nothing new

    drifted = drift.monitor(cfg, DRIFT_DAY, DRIFT_DAY + NEXT, RunContext("drift_monitor", "test-drift", "t", "test"))
    d = drifted["models"]["intent-classifier"]
    assert d["verdict"] == "drifted" and drifted["drifted"] == ["intent-classifier"]
    assert d["drift_score"] >= cfg.drift.psi_threshold > ic["drift_score"]
    assert drifted["reason"].startswith("drift monitor: intent-classifier ") and "2026-11-21" in drifted["reason"]
    assert ">= 0.25" in drifted["reason"] or ">= 0.2" in drifted["reason"]
    assert drifted["drift_key"] == f"intent-classifier.v{monitored['champion']}.{monitored['calibration'].version}"
    print("\nundrifted:", stable["models"]["intent-classifier"], "\ndrifted:", d, "\nreason:", drifted["reason"])

    run = client.get_run(d["run_id"])
    assert run.info.run_name == "drift check 2026-11-21" and run.data.tags["stage"] == "drift-check"
    assert run.data.tags["drift.verdict"] == "drifted" and run.data.tags["airflow.run_id"] == "test-drift"
    m = run.data.metrics
    assert m["drift_score"] == pytest.approx(d["drift_score"], abs=1e-4)
    assert {"psi.chars", "ks.chars", "psi.non_english", "psi.predicted_label", "psi.confidence",
            "psi.layer.1.output.LayerNorm.absmax", "ks.layer.0.intermediate.act.p99",
            "overflow.layer.1.output.LayerNorm"} <= set(m)
    assert m["psi.non_english"] > 0.25  # 6 % -> 35 % non-English
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"drift_features.json", "activation_ranges.json", "plots/psi_by_feature.png",
            "plots/most_shifted_features.png"} <= artifacts
    ranges = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/activation_ranges.json")
    assert set(ranges) == {"reference", "live", "overflow"}

    empty = drift.monitor(cfg, date(2026, 11, 1), date(2026, 11, 2), RunContext("drift_monitor", "t-empty", "t", "test"))
    assert empty["models"]["intent-classifier"]["verdict"] == "insufficient data" and empty["reason"] is None


def test_wilson_interval_matches_published_values():
    from qat_tasks.core.metrics import wilson_interval

    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # Wilson 1927; Newcombe 1998, table I
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing counted: nothing known


def test_reviewed_figures_join_people_s_labels_to_the_champion_s_answers(monitored, tmp_path):
    """The service logs the champion's answers without labels; once people's reviews are imported, the drift
    check reports how often the champion agreed with them, with its interval, and logs it to MLflow."""
    from qat_tasks.core.metrics import wilson_interval
    from qat_tasks.core.schema import INTENTS
    from qat_tasks.core.tracking import RunContext
    from qat_tasks.data.labels import import_labels
    from qat_tasks.monitoring import drift
    from qat_tasks.serving.app import IntentRequest
    from qat_tasks.serving.service import Service

    cfg, client = monitored["cfg"], monitored["client"]
    service = Service(cfg, "intent-classifier", mirror=False)
    try:
        answers = [service.answer(IntentRequest(text=f"where is my order of Frieren volume {i}", request_id=f"rv-{i}"))
                   for i in range(30)]
    finally:
        service.close()
    now = datetime.now(UTC)
    today, tomorrow = now.date(), now.date() + NEXT
    before = drift.monitor(cfg, today, tomorrow, RunContext("drift_monitor", "rv-before", "t", "test"))
    assert before["models"]["intent-classifier"]["reviewed"]["turns"] == 0

    def review(i: int, answer: str) -> str:
        if i < 20:
            return answer  # people agree
        if i < 24:
            return "escalation" if answer != "escalation" else "chitchat"  # a frustrated customer the model missed
        return next(x for x in INTENTS if x != answer)

    truth = {a["request_id"]: review(i, a["intent"]) for i, a in enumerate(answers)}
    # ... and one label is for a request that was never logged
    at = (now + timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    export = tmp_path / "reviews.csv"
    export.write_text("request_id,reviewed_label,reviewer,reviewed_at\n" + "".join(
        f"{rid},{label},annotator-1,{at}\n" for rid, label in [*truth.items(), ("rv-never-logged", "chitchat")]))
    assert import_labels(export, cfg.serving_log_dir)["written"] == 31

    after = drift.monitor(cfg, today, tomorrow, RunContext("drift_monitor", "rv-after", "t", "test"))
    figures = after["models"]["intent-classifier"]["reviewed"]
    agree = sum(a["intent"] == truth[a["request_id"]] for a in answers)
    assert figures["turns"] == 30 and figures["accuracy"] == pytest.approx(agree / 30)
    assert figures["accuracy_ci95"] == [round(x, 4) for x in wilson_interval(agree, 30)]
    escalations = [a for a in answers if truth[a["request_id"]] == "escalation"]
    assert figures["escalation_turns"] == len(escalations) > 0
    assert figures["escalation_recall"] == pytest.approx(
        sum(a["intent"] == "escalation" for a in escalations) / len(escalations))
    m = client.get_run(after["models"]["intent-classifier"]["run_id"]).data.metrics
    assert m["reviewed.turns"] == 30 and m["reviewed.accuracy"] == pytest.approx(agree / 30)


def _recalibration_runs():
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        runs = s.scalars(select(DagRun).where(DagRun.dag_id == "quarterly_recalibration",
                                              DagRun.run_id.like("drift\\_\\_%", escape="\\"))).all()
        return {r.run_id: dict(r.conf or {}) for r in runs}


def test_dag_triggers_the_recalibration_only_on_drift(monitored, airflow_db, tmp_path, monkeypatch):
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    config = tmp_path / "drift.yaml"
    config.write_text(yaml.safe_dump(monitored["cfg"].model_dump(mode="json")))
    monkeypatch.setenv("QAT_CONFIG", str(config))  # the DAG file reads its config at parse time
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["drift_monitor"]
    before = _recalibration_runs()
    try:
        quiet = dag.test(run_conf={"reason": "test: undrifted day", "window_start": STABLE_DAY.isoformat(),
                                   "window_end": (STABLE_DAY + NEXT).isoformat()},
                         logical_date=datetime(2026, 11, 21, 2, 30, tzinfo=UTC))
        states = {ti.task_id: ti.state for ti in quiet.get_task_instances()}
        assert quiet.state == "success" and states["check"] == "success"
        assert states["trigger_recalibration"] == "skipped" and _recalibration_runs() == before

        loud = dag.test(run_conf={"reason": "test: catalogue launch", "window_start": DRIFT_DAY.isoformat(),
                                  "window_end": (DRIFT_DAY + NEXT).isoformat()},
                        logical_date=datetime(2026, 11, 22, 2, 30, tzinfo=UTC))
        states = {ti.task_id: ti.state for ti in loud.get_task_instances()}
        assert loud.state == "success" and states["trigger_recalibration"] == "success"
        new = {k: v for k, v in _recalibration_runs().items() if k not in before}
        version = monitored["calibration"].version
        assert list(new) == [f"drift__intent-classifier.v{monitored['champion']}.{version}"]
        (conf,) = new.values()
        assert conf["triggered_by"] == "drift" and conf["models"] == ["intent-classifier"]
        assert conf["reason"].startswith("drift monitor: intent-classifier") and 3 <= len(conf["reason"]) <= 500
        assert (conf["window_start"], conf["window_end"]) == ("2026-10-23", "2026-11-22")

        # The same drift state again (same champion, same calibration): logged, but not triggered twice
        again = dag.test(run_conf={"reason": "test: still drifted", "window_start": DRIFT_DAY.isoformat(),
                                   "window_end": (DRIFT_DAY + NEXT).isoformat()},
                         logical_date=datetime(2026, 11, 22, 3, 30, tzinfo=UTC))
        assert again.state == "success"
        assert {ti.task_id: ti.state for ti in again.get_task_instances()}["trigger_recalibration"] == "skipped"
        assert len(_recalibration_runs()) == len(before) + 1
    finally:
        _delete_runs(set(_recalibration_runs()) - set(before))


def _delete_runs(run_ids: set[str]) -> None:
    """Leave the session's Airflow DB as other tests expect it: no queued recalibration runs from here."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete

    with create_session() as s:
        s.execute(delete(DagRun).where(DagRun.dag_id == "quarterly_recalibration", DagRun.run_id.in_(run_ids)))


def test_dag_shape_and_params(tiny_config_path):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk.definitions.param import ParamValidationError

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["drift_monitor"]
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable" and dag.timetable.expression == "0 2 * * *"
    assert dag.max_active_runs == 1 and not dag.catchup and all(t.retries >= 2 for t in dag.tasks)
    assert "trigger_recalibration" in dag.get_task("recalibration_request").downstream_task_ids
    trigger = dag.get_task("trigger_recalibration")
    assert trigger.trigger_dag_id == "quarterly_recalibration" and not trigger.wait_for_completion
    for key, bad in [("reason", "no"), ("models", ["reranker"]), ("window_start", "yesterday"),
                     ("recalibration_days", 365)]:
        with pytest.raises(ParamValidationError):
            dag.params.get_param(key).resolve(bad)


def test_plan_windows():
    from qat_tasks.core.config import load_config
    from qat_tasks.core.params import ParamError
    from qat_tasks.monitoring.drift import plan_check

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    kw = {"dag_id": "drift_monitor", "run_id": "r", "reference": datetime(2026, 10, 1, 2, tzinfo=UTC)}
    interval = (datetime(2026, 9, 30, 2, tzinfo=UTC), datetime(2026, 10, 1, 2, tzinfo=UTC))
    sched = plan_check(cfg, {"reason": "daily drift check"}, run_type="scheduled", interval=interval, **kw)
    assert sched["window"] == {"start": "2026-09-30", "end": "2026-10-01"} and sched["ctx"]["trigger"] == "scheduled"
    assert sched["models"] == ["intent-classifier", "escalation-detector"]
    manual = plan_check(cfg, {"reason": "after the launch", "models": ["intent-classifier"]}, run_type="manual", **kw)
    assert manual["window"] == {"start": "2026-09-30", "end": "2026-10-01"} and manual["models"] == ["intent-classifier"]
    for params, match in [({"reason": " "}, "reason"), ({"reason": "ok!", "models": ["reranker"]}, "not monitored"),
                          ({"reason": "ok!", "window_start": "2026-09-01"}, "both or neither"),
                          ({"reason": "ok!", "window_start": "2026-09-02", "window_end": "2026-09-01"}, "after")]:
        with pytest.raises(ParamError, match=match):
            plan_check(cfg, params, run_type="manual", **kw)
