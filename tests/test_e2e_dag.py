"""The quarterly DAG end to end with Airflow's dag.test(): temporary SQLite Airflow DB, temporary SQLite
MLflow store, generated traffic, tiny random-initialised encoder. Then the retry guarantees."""

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import WINDOW

ROOT = Path(__file__).resolve().parent.parent
CONF = {"reason": "e2e test: new catalogue", "window_start": WINDOW[0].isoformat(), "window_end": WINDOW[1].isoformat()}

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def dag_run(airflow_db, tiny_config_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["quarterly_recalibration"]
    dr = dag.test(run_conf=CONF, logical_date=datetime(2026, 7, 16, tzinfo=UTC))
    return dr


@pytest.fixture(scope="module")
def mlflow_client(tiny_config_path):
    from qat_tasks.core.config import load_config
    from qat_tasks.core.tracking import configure

    return configure(load_config(tiny_config_path))


def _xcom(dr, task_id):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as s:
        rows = s.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dr.dag_id, task_ids=task_id, key="return_value")).all()
        return [XComModel.deserialize_value(r) for r in sorted(rows, key=lambda r: r.map_index)]


def _drop_alias(client, name: str, alias: str) -> None:
    from qat_tasks.core import registry

    if registry.alias_version(client, name, alias) is not None:
        client.delete_registered_model_alias(name, alias)


def _stage(value: dict) -> dict:
    """A task's result as its stage returned it: the task adds what it cost (`profile`)."""
    return {k: v for k, v in value.items() if k != "profile"}


def _of(dr, task_id, model="intent-classifier") -> dict:
    """The mapped task instance's result for one model."""
    (value,) = [v for v in _xcom(dr, task_id) if v["model"] == model]
    return value


def test_dag_run_succeeds(dag_run):
    assert dag_run.state == "success"
    for task_id in ("ensure_champion", "evaluate_champion", "int8_challenger"):
        assert sorted(v["model"] for v in _xcom(dag_run, task_id)) == ["escalation-detector", "intent-classifier",
                                                                       "reranker"]


def _champion_versions(client) -> list:
    """FP32 champion versions (an INT8 challenger may or may not pass the tiny model's gates)."""
    return [v for v in client.search_model_versions("name = 'mangaassist-intent-classifier'")
            if v.tags.get("method") == "fp32"]


def test_champion_is_registered_with_lineage(dag_run, mlflow_client, tmp_path):
    name = "mangaassist-intent-classifier"
    assert len(_champion_versions(mlflow_client)) == 1
    champ = mlflow_client.get_model_version_by_alias(name, "champion")
    assert champ.tags["method"] == "fp32" and champ.tags["airflow.run_id"] == dag_run.run_id
    assert champ.tags["calibration_version"].startswith("20260701-20260715-")
    # The package carries the temperature the evaluation fits on the same held-out rows: what the service serves
    # is what the offline ECE-after-scaling gate judged.
    from qat_tasks.core import registry

    meta = json.loads(registry.download(name, champ.version, tmp_path / "champ")["meta"].read_text())
    evaluated = _of(dag_run, "evaluate_champion", "intent-classifier")["metrics"]["temperature"]
    assert meta["temperature"] == pytest.approx(evaluated, rel=1e-3) and meta["temperature"] > 0


def test_mlflow_holds_runs_datasets_metrics_and_plots(dag_run, mlflow_client):
    cal_exp = mlflow_client.get_experiment_by_name("mangaassist-calibration")
    (refresh_run,) = mlflow_client.search_runs([cal_exp.experiment_id],
                                               f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    inputs = {t.value: inp for inp in refresh_run.inputs.dataset_inputs for t in inp.tags
              if t.key == "mlflow.data.context"}
    assert set(inputs) == {"calibration", "qat_train", "selection", "evaluation"}
    tags = {t.key: t.value for t in inputs["evaluation"].tags}
    assert tags["calibration.version"] == refresh_run.data.tags["calibration.version"] and "escalation" in tags["per_intent"]
    artifacts = {a.path for a in mlflow_client.list_artifacts(refresh_run.info.run_id)}
    assert {"manifest.json", "composition.png", "quarantine"} <= artifacts

    exp = mlflow_client.get_experiment_by_name("mangaassist-intent-classifier")
    runs = mlflow_client.search_runs([exp.experiment_id], f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    by_stage = {r.data.tags.get("stage", "parent"): r for r in runs}
    required = {"parent", "bootstrap-champion", "evaluate-champion", "int8-candidate", "int8-champion-selection",
                "int8-decision"}
    # mixed precision runs only when no candidate passes (the tiny model's latency gate is noisy)
    assert required <= set(by_stage) <= required | {"int8-mixed-precision"}
    parent = by_stage["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["trigger.reason"] == CONF["reason"]
    assert parent.data.tags["airflow.dag_id"] == "quarterly_recalibration"
    assert parent.data.tags["calibration.version"] == refresh_run.data.tags["calibration.version"]
    for child in ("bootstrap-champion", "evaluate-champion", "int8-candidate", "int8-decision"):
        assert by_stage[child].data.tags["mlflow.parentRunId"] == parent.info.run_id
    metrics = by_stage["evaluate-champion"].data.metrics
    for key in ("accuracy", "macro_f1", "rare_class_accuracy", "escalation_recall", "ece", "p95_ms", "size_mb"):
        assert key in metrics
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["p95_ms"] > 0
    plots = {a.path for a in mlflow_client.list_artifacts(by_stage["evaluate-champion"].info.run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/reliability_diagram.png", "plots/per_class_recall.png",
            "plots/latency_distribution.png"} <= plots
    assert "champion.accuracy" in parent.data.metrics


def test_xcom_carries_ids_and_uris_not_data(dag_run):
    (cal,) = _xcom(dag_run, "refresh_calibration")
    assert set(cal) == {"version", "uri", "run_id", "rows", "warnings", "profile"}
    assert set(cal["profile"]) == {"task", "wall_s", "isolated", "peak_rss_mb", "tree_peak_rss_mb"}
    assert Path(cal["uri"]).is_dir()
    for task_id in ("ensure_champion", "evaluate_champion"):
        for value in _xcom(dag_run, task_id):
            assert len(str(value)) < 2000


def test_retrying_stages_of_the_same_run_duplicates_nothing(dag_run, mlflow_client, tiny_config):
    from qat_tasks import pipeline

    (run,) = _xcom(dag_run, "plan")
    (cal,) = _xcom(dag_run, "refresh_calibration")
    name = "mangaassist-intent-classifier"
    # A retried refresh returns the finished result; a retried champion task after the process died
    # between registering and aliasing restores the alias without a second version.
    assert pipeline.refresh_stage(tiny_config, run, progress=False) == _stage(cal)
    mlflow_client.delete_registered_model_alias(name, "champion")
    champion = pipeline.champion_stage(tiny_config, run, cal, "intent-classifier")
    assert champion["version"] == "1"
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "1"
    evaluation = pipeline.evaluate_stage(tiny_config, run, cal, champion)
    assert evaluation == _stage(_of(dag_run, "evaluate_champion"))
    decision = _of(dag_run, "int8_challenger")
    assert pipeline.challenger_stage(tiny_config, run, cal, champion) == _stage(decision)
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1 + (decision["registered_version"] is not None)
    exp = mlflow_client.get_experiment_by_name("mangaassist-intent-classifier")
    # parent, bootstrap, evaluation, two INT8 candidates, the champion on the selection split, INT8 decision
    # (+ mixed precision when nothing passed)
    runs = mlflow_client.search_runs([exp.experiment_id], f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    mixed = sum(r.data.tags.get("stage") == "int8-mixed-precision" for r in runs)
    assert mixed <= 1 and len(runs) == 7 + mixed


def test_a_second_run_reuses_the_champion(dag_run, mlflow_client, tiny_config_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["quarterly_recalibration"]
    dr2 = dag.test(run_conf={**CONF, "reason": "drift: checkout_help", "triggered_by": "drift"},
                   logical_date=datetime(2026, 7, 17, tzinfo=UTC))
    assert dr2.state == "success"
    assert len(_champion_versions(mlflow_client)) == 1
    champion = _of(dr2, "ensure_champion")
    assert champion["bootstrapped"] is False
    # The same window, so the same calibration rows: every measurement whose inputs did not change (the champion
    # version, the rows, the settings) is taken from the first run, which its stage run in this one names.
    for model, stages in (("escalation-detector", {"evaluate-champion", "int8-candidate", "int8-champion-selection"}),
                          ("fallback-llm", {"llm-unquantized", "llm-candidate"})):
        exp = mlflow_client.get_experiment_by_name(f"mangaassist-{model}")
        first = {r.info.run_id for r in mlflow_client.search_runs(
            [exp.experiment_id], f"tags.`airflow.run_id` = '{dag_run.run_id}'")}
        second = mlflow_client.search_runs([exp.experiment_id], f"tags.`airflow.run_id` = '{dr2.run_id}'")
        reused = [r for r in second if r.data.tags.get("stage") in stages]
        assert {r.data.tags["stage"] for r in reused} == stages
        for r in reused:
            assert r.data.tags["qat.reused_from"] in first, (model, r.data.tags["stage"])
            assert r.info.run_name.endswith("(unchanged)") and r.data.metrics
        # The decision is made again, on the evaluation split, by this run.
        decision = next(r for r in second if r.data.tags.get("stage", "").endswith("-decision"))
        assert "qat.reused_from" not in decision.data.tags


def test_a_new_challenger_goes_into_shadow(dag_run, mlflow_client):
    """A registered INT8 challenger gets @shadow (the tiny config reviews live, so it stays there); nothing else
    moves: @champion is still the FP32 version."""
    decision, shadowed = _of(dag_run, "int8_challenger"), _of(dag_run, "shadow_and_promote")
    name = "mangaassist-intent-classifier"
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == "1"
    if decision["registered_version"] is None:
        assert shadowed["outcome"] == "no challenger to shadow"
        return
    assert shadowed["outcome"].startswith(f"v{decision['registered_version']} in shadow since")
    mv = mlflow_client.get_model_version_by_alias(name, "shadow")
    assert str(mv.version) == decision["registered_version"] and mv.tags["shadow.deployed_by"] == dag_run.run_id
    (report,) = _xcom(dag_run, "report")
    assert report["shadows"]["intent-classifier"] == shadowed["outcome"]
    # The other encoders' challengers go to @shadow too: the service mirrors and logs every served encoder.
    for model in ("escalation-detector", "reranker"):
        other = _of(dag_run, "shadow_and_promote", model)
        assert other["outcome"] == "no challenger to shadow" or " in shadow since " in other["outcome"], other


def test_registered_champion_serves_through_mlflow_pyfunc(dag_run, mlflow_client):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/mangaassist-intent-classifier@champion")
    out = model.predict(pd.DataFrame({"text": ["where is my order MA-2026-104233", "hi"]}))
    assert list(out.columns) == ["intent", "confidence"] and len(out) == 2
    assert out["confidence"].between(0, 1).all()


def test_int8_decision_is_logged_with_gates_and_plots(dag_run, mlflow_client):
    decision = _of(dag_run, "int8_challenger")
    run = mlflow_client.get_run(decision["run_id"])
    arts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"selection_comparison.json", "selection_screen.json"} <= arts
    plots = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/accuracy_vs_p95.png", "plots/latency_distributions.png"} <= plots
    assert "selection.champion.p95_ms" in run.data.metrics and "selection.champion.ece_after_ts" in run.data.metrics
    tag = run.data.tags["decision"]
    assert (tag == "no candidate passed" or tag.startswith("finalist ")
            or tag == f"registered mangaassist-intent-classifier v{decision['registered_version']} as @challenger")
    if "decision.finalist" in run.data.tags:  # a finalist met the evaluation split: its gate table is there
        assert {"gate_table.json", "evidence", "plots/gate_intervals.png"} <= arts | plots
        assert "champion.p95_ms" in run.data.metrics and "finalist.accuracy" in run.data.metrics


def _another_run(dag_run, suffix: str) -> tuple[dict, dict]:
    """The plan and calibration of the e2e run, as another DAG run (its id + suffix) would carry them."""
    (run,) = _xcom(dag_run, "plan")
    (cal,) = _xcom(dag_run, "refresh_calibration")
    return {**run, "ctx": {**run["ctx"], "run_id": run["ctx"]["run_id"] + suffix}}, cal


def cal_rows(cal: dict, split: str) -> list[dict]:
    from qat_tasks.data.calibration_set import load_split

    return load_split(cal["uri"], split)


def _every_candidate_passes(cfg):
    """The config with intent-classifier gates no candidate can fail."""
    return cfg.model_copy(update={"gates": cfg.gates.model_copy(update={
        "intent_classifier": cfg.gates.intent_classifier.model_copy(update={
            "max_accuracy_drop_pts": 100.0, "max_rare_class_accuracy_drop_pts": 100.0,
            "max_escalation_recall_drop_pts": 100.0, "max_ece_increase": 1.0, "max_p95_ratio": 100.0})})})


def test_challenger_registered_once_when_gates_pass(dag_run, mlflow_client, tiny_config, tmp_path):
    """With gates every candidate passes, the best is registered as @challenger, with lineage, exactly once."""
    import mlflow.pyfunc
    import pandas as pd

    from qat_tasks import pipeline
    from qat_tasks.core import registry

    run, cal = _another_run(dag_run, "-lenient")
    champion = _of(dag_run, "ensure_champion")
    lenient = _every_candidate_passes(tiny_config)
    name = "mangaassist-intent-classifier"
    before = len(mlflow_client.search_model_versions(f"name = '{name}'"))
    first = pipeline.challenger_stage(lenient, run, cal, champion)
    assert first["registered_version"] is not None and first["method"] in ("ptq_dynamic", "ptq_static_minmax")
    # The finalist was judged on the evaluation split by paired intervals, timed interleaved with the champion.
    table = {g["gate"]: g for g in first["gates"]}
    assert {"accuracy", "rare_class_accuracy", "ece_after_ts", "p95_ratio"} <= set(table)
    acc = table["accuracy"]
    assert acc["verdict"] == "pass" and acc["ci_low"] <= acc["loss"] <= acc["ci_high"] and acc["unit"] == "reviewed rows"
    assert acc["units"] == len(cal_rows(cal, "evaluation")) and table["p95_ratio"]["unit"] == "timing rounds"
    mv = mlflow_client.get_model_version(name, first["registered_version"])
    assert mv.tags["gates.decided_by"] == "95 % interval" and mv.tags["gates.point_rule"] == "none"
    # The version's MLflow model lists its evaluation figures and gate intervals, against the evaluation data set.
    from qat_tasks.promotion.decision import model_id_of

    logged = {m.key: m for m in mlflow_client.get_logged_model(model_id_of(mv)).metrics}
    assert {"accuracy", "p95_ms", "gate.accuracy.ci_low", "gate.accuracy.ci_high"} <= set(logged)
    assert logged["accuracy"].dataset_name.startswith("intent-classifier-evaluation-")
    again = pipeline.challenger_stage(lenient, run, cal, champion)
    assert again == first
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == before + 1
    mv = mlflow_client.get_model_version_by_alias(name, "challenger")
    assert str(mv.version) == first["registered_version"]
    assert mv.tags["champion_version"] == champion["version"] and mv.tags["method"] == first["method"]
    assert mv.tags["calibration_version"] == cal["version"]
    assert mv.tags["gates.offline"] == "passed"
    meta = json.loads(registry.download(name, mv.version, tmp_path / "chal")["meta"].read_text())
    assert meta["temperature"] == pytest.approx(first["metrics"]["temperature"])  # the INT8 model's own
    out = mlflow.pyfunc.load_model(f"models:/{name}@challenger").predict(pd.DataFrame({"text": ["hi", "refund pls"]}))
    assert len(out) == 2


def test_a_retried_int8_decision_keeps_the_version_an_earlier_attempt_registered(dag_run, mlflow_client, tiny_config,
                                                                                 monkeypatch):
    """An attempt registers its choice and dies before its result is stored. The retry re-measures the champion
    and would rank the candidates the other way round, yet it keeps the registered version and its choice: one
    decision per DAG run, and the version's tags match it."""
    from qat_tasks import pipeline
    from qat_tasks.encoders import roles
    from qat_tasks.promotion import decision

    run, cal = _another_run(dag_run, "-decide-once")
    champion = _of(dag_run, "ensure_champion")
    lenient = _every_candidate_passes(tiny_config)
    name = "mangaassist-intent-classifier"
    before = len(mlflow_client.search_model_versions(f"name = '{name}'"))
    registered = decision.register_challenger

    def dies_after_registering(*a, **k):
        registered(*a, **k)
        raise RuntimeError("injected: the worker died after registering")

    monkeypatch.setattr(decision, "register_challenger", dies_after_registering)
    # The same rows rebuild the graph @challenger already holds, which registers nothing: without the alias, this
    # run's finalist is new to the registry.
    _drop_alias(mlflow_client, name, "challenger")
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.challenger_stage(lenient, run, cal, champion)
    monkeypatch.setattr(decision, "register_challenger", registered)
    (first,) = [v for v in mlflow_client.search_model_versions(f"name = '{name}'")
                if v.tags.get("airflow.run_id") == run["ctx"]["run_id"]]
    role = type(roles.role_for(lenient, "intent-classifier"))
    rank = role.rank_key
    monkeypatch.setattr(role, "rank_key", lambda self, m: tuple(-x for x in rank(self, m)))  # the other way round
    retried = pipeline.challenger_stage(lenient, run, cal, champion)
    assert retried["method"] == first.tags["method"] and retried["registered_version"] == str(first.version)
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == before + 1


def test_the_llm_decision_registers_after_the_state_folder_is_lost(dag_run, mlflow_client, tiny_config, monkeypatch):
    """The worker that quantized the candidates is gone with its state folder (only the calibration store and
    MLflow, S3 and the tracking server in production, remain); the decision, retried elsewhere, still registers
    the best candidate from the checkpoint its candidate run logged to MLflow."""
    import shutil

    from qat_tasks import pipeline
    from qat_tasks.llm import track

    run, cal = _another_run(dag_run, "-lost-state")
    decide = track._decide
    # Another DAG run on the same rows finds @challenger holding the checkpoint it would register: without the alias,
    # the finalist is new to the registry.
    _drop_alias(mlflow_client, "mangaassist-fallback-llm", "challenger")

    def dies(*a, **k):
        raise RuntimeError("injected: the worker died before the decision")

    monkeypatch.setattr(track, "_decide", dies)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.llm_stage(tiny_config, run, cal, "fallback-llm")
    monkeypatch.setattr(track, "_decide", decide)
    state = tiny_config.state_path
    assert (state / "llm").is_dir()
    for child in state.iterdir():
        if child.name != "calibration":  # the store: S3 in production
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    result = pipeline.llm_stage(tiny_config, run, cal, "fallback-llm")
    versions = [v for v in mlflow_client.search_model_versions("name = 'mangaassist-fallback-llm'")
                if v.tags.get("airflow.run_id") == run["ctx"]["run_id"]]
    assert [str(v.version) for v in versions] == [result["registered_version"]]
    assert versions[0].tags["method"] == result["method"]
    files = {f.path for f in mlflow_client.list_artifacts(versions[0].tags["candidate_run_id"], "checkpoint")}
    assert any(f.endswith(".safetensors") for f in files)


def test_sensitivity_and_fp32_fallback_on_the_tiny_champion(dag_run, tmp_path, tiny_config):
    import onnx

    from qat_tasks.encoders.int8 import ort_quant, sensitivity
    from qat_tasks.encoders.int8.track import Workbench

    (cal,) = _xcom(dag_run, "refresh_calibration")
    champion = _of(dag_run, "ensure_champion")
    wb = Workbench(tiny_config, "intent-classifier", cal["uri"], champion, tmp_path)
    recipe = sensitivity.Recipe(wb.preprocessed, "dynamic")
    rows = sensitivity.analyse(recipe, wb.quality, wb.batches, 99.9, tmp_path / "sens")
    assert {r["unit"] for r in rows} == {"embeddings", "encoder.layer.0", "encoder.layer.1"}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    steps = sensitivity.fallback_steps(rows, 2)
    assert steps == [[rows[0]["unit"]], [rows[0]["unit"], rows[1]["unit"]]]
    kept = sensitivity.nodes_of(recipe, ["encoder.layer.0"])
    out = sensitivity.quantize(recipe, tmp_path / "mixed.onnx", wb.batches, 99.9, exclude=kept)
    graph = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    matmuls_kept = [n for n in kept if n in graph and graph[n] == "MatMul"]
    assert matmuls_kept, "excluded layer-0 MatMuls stay FP32"
    assert any(op == "MatMulInteger" for op in graph.values()), "the rest is INT8"
    assert "encoder.layer.1" in ort_quant.quantizable_units(wb.preprocessed)


def test_mixed_precision_runs_when_nothing_passes(dag_run, mlflow_client, tiny_config):
    from qat_tasks import pipeline

    (run,) = _xcom(dag_run, "plan")
    (cal,) = _xcom(dag_run, "refresh_calibration")
    champion = _of(dag_run, "ensure_champion")
    m = tiny_config.models[0]
    model = m.model_copy(update={"quantization": m.quantization.model_copy(update={
        "candidates": ("ptq_dynamic",), "max_fp32_units": 2})})
    exp = mlflow_client.get_experiment_by_name("mangaassist-intent-classifier")

    def impossible(suffix: str, **gates: float):
        g = tiny_config.gates.intent_classifier.model_copy(update=gates)
        cfg = tiny_config.model_copy(update={"gates": tiny_config.gates.model_copy(update={"intent_classifier": g}),
                                             "models": (model, *tiny_config.models[1:])})
        r = {**run, "ctx": {**run["ctx"], "run_id": run["ctx"]["run_id"] + suffix}}
        return pipeline.challenger_stage(cfg, r, cal, champion), r["ctx"]["run_id"]

    # A latency the champion cannot be beaten by: keeping layers in FP32 only slows a candidate, so it is not tried.
    decision, run_id = impossible("-too-slow", max_p95_ratio=1e-6)
    assert decision["registered_version"] is None and "p95_ratio" in decision["why"]["ptq_dynamic"]
    assert not mlflow_client.search_runs([exp.experiment_id], f"tags.stage = 'int8-mixed-precision' and "
                                                               f"tags.`airflow.run_id` = '{run_id}'")
    # An accuracy gain no candidate makes, at a latency they meet: the fallback is tried up to its limit, and fails.
    decision, run_id = impossible("-impossible", max_accuracy_drop_pts=-100.0, max_p95_ratio=100.0)
    assert decision["registered_version"] is None and "accuracy" in decision["why"]["ptq_dynamic"]
    (mixed,) = mlflow_client.search_runs([exp.experiment_id], f"tags.stage = 'int8-mixed-precision' and "
                                                               f"tags.`airflow.run_id` = '{run_id}'")
    assert mixed.data.tags["mixed_precision.outcome"] == "no pass with up to 2 FP32 units"
    arts = {a.path for a in mlflow_client.list_artifacts(mixed.info.run_id)}
    assert "sensitivity.json" in arts
    assert len(mlflow_client.get_metric_history(mixed.info.run_id, "fallback.accuracy")) == 2


def test_qat_static_keeps_the_activation_ranges_qat_learned(dag_run, tmp_path, tiny_config):
    import onnx
    from onnx import numpy_helper

    from qat_tasks.encoders.int8 import qat
    from qat_tasks.encoders.int8.track import Workbench

    (cal,) = _xcom(dag_run, "refresh_calibration")
    champion = _of(dag_run, "ensure_champion")
    wb = Workbench(tiny_config, "intent-classifier", cal["uri"], champion, tmp_path)
    m = tiny_config.models[0]
    qc = m.quantization.model_copy(update={"qat_static_ranges": "qat"})
    path, info = qat.build("qat_static", wb.hf_model, wb.tokenizer, wb.labels, wb.train_rows[:128], wb.batches,
                           wb.max_length, m.training, qc, tmp_path / "qat", wb.trained, None)
    assert info["steps"] >= 1 and info["observers_frozen_at"] < info["steps"]
    ranges = wb.trained["labels"][2]
    node = "/bert/encoder/layer.0/attention/self/query/MatMul"
    lo, hi = ranges[node]
    graph = onnx.load(str(path)).graph
    pre = onnx.load(str(wb.trained["labels"][0])).graph
    act = next(n.input[0] for n in pre.node if n.name == node)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    (q,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == act]
    assert abs(float(inits[q.input[1]]) - (hi - lo) / 255) < 1e-6 * max(1.0, hi - lo)


def test_retry_after_a_failed_attempt_that_had_registered_reuses_the_version(dag_run, mlflow_client, tiny_config,
                                                                             monkeypatch):
    """An attempt registers, then dies setting the alias (a transient MLflow error); its retry runs in a new
    MLflow run but must find that version instead of registering a second one."""
    from qat_tasks import pipeline

    (run,) = _xcom(dag_run, "plan")
    (cal,) = _xcom(dag_run, "refresh_calibration")
    name = "mangaassist-intent-classifier"
    run = {**run, "ctx": {**run["ctx"], "run_id": run["ctx"]["run_id"] + "-flaky"}}
    saved = mlflow_client.get_model_version_by_alias(name, "champion").version
    mlflow_client.delete_registered_model_alias(name, "champion")  # force a bootstrap in this new run
    before = len(mlflow_client.search_model_versions(f"name = '{name}'"))
    calls = {"n": 0}
    from mlflow import MlflowClient

    original = MlflowClient.set_registered_model_alias

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected: MLflow unavailable while setting the alias")
        return original(self, *a, **k)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        pipeline.champion_stage(tiny_config, run, cal, "intent-classifier")
    champion = pipeline.champion_stage(tiny_config, run, cal, "intent-classifier")
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", original)
    assert len(mlflow_client.search_model_versions(f"name = '{name}'")) == before + 1
    assert str(mlflow_client.get_model_version_by_alias(name, "champion").version) == champion["version"]
    mlflow_client.set_registered_model_alias(name, "champion", saved)


def test_escalation_detector_track_judges_recall_at_a_tuned_threshold(dag_run, mlflow_client):
    import json

    import mlflow.pyfunc
    import pandas as pd

    name = "mangaassist-escalation-detector"
    champ = mlflow_client.get_model_version_by_alias(name, "champion")
    assert champ.tags["method"] == "fp32"
    evaluation = _of(dag_run, "evaluate_champion", "escalation-detector")
    m = evaluation["metrics"]
    assert 0 < m["threshold"] < 1 and 0 <= m["escalation_recall"] <= 1 and "escalation_precision" in m
    assert "escalation recall" in evaluation["headline"]
    run = mlflow_client.get_run(evaluation["run_id"])
    summary = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                  artifact_path="data_summary.json")).read())
    # VADER's human-rated sentences and MangaAssist traffic, both labels, in every split
    assert set(summary["counts"]["evaluation"]) >= {"mangaassist/calm", "amazon_review/frustrated",
                                                    "tweet/frustrated"}
    out = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(
        pd.DataFrame({"text": ["this is ridiculous, get me a manager NOW", "do you have One Piece volume 3"]}))
    assert list(out.columns) == ["label", "p_frustrated", "escalate"]
    assert str(champ.version) == "1"
    assert (out["escalate"] == (out["label"] == "frustrated")).all()
    decision = _of(dag_run, "int8_challenger", "escalation-detector")
    gates = json.loads(open(mlflow.artifacts.download_artifacts(run_id=decision["run_id"],
                                                                artifact_path="selection_screen.json")).read())
    assert {g["gate"] for v in gates.values() for g in v} == {"parity", "escalation_recall", "escalation_precision",
                                                              "ece_after_ts", "p95_ratio"}


def test_reranker_track_ranks_twenty_candidates(dag_run, mlflow_client, tmp_path):
    import mlflow.pyfunc
    import onnx
    import pandas as pd

    from qat_tasks.core import registry

    name = "mangaassist-reranker"
    evaluation = _of(dag_run, "evaluate_champion", "reranker")
    m = evaluation["metrics"]
    assert 0 < m["ndcg_at_10"] <= 1 and 0 < m["mrr_at_10"] <= 1 and m["groups"] == 20
    # a random ranker of 20 finds the relevant passage in the top 10 half the time; NDCG is bounded by 1
    assert m["ndcg_at_10"] >= m["mrr_at_10"]
    out = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({
        "text": ["do you have Berserk volume 3"] * 2,
        "text_pair": ["Berserk volume 3, paperback.", "Naruto volume 9, box set."]}))
    assert list(out.columns) == ["score"] and len(out) == 2
    # the cross-encoder's graph tells query from passage, as BERT cross-encoders are trained to
    paths = registry.download(name, "1", tmp_path)
    assert [i.name for i in onnx.load(str(paths["onnx"])).graph.input] == ["input_ids", "attention_mask",
                                                                           "token_type_ids"]
    decision = _of(dag_run, "int8_challenger", "reranker")
    run = mlflow_client.get_run(decision["run_id"])
    assert "selection.champion.ndcg_at_10" in run.data.metrics and "selection.champion.mrr_at_10" in run.data.metrics
    plots = {a.path for a in mlflow_client.list_artifacts(decision["run_id"], "plots")}
    assert "plots/accuracy_vs_p95.png" in plots


def test_llm_track_registers_a_4bit_challenger_once_with_its_evidence(dag_run, mlflow_client, tiny_config):
    """The 4-bit track of the tiny random Llama: unquantized reference with per-block sensitivity, three
    candidates (RTN, GPTQ on MangaAssist conversations, AWQ with the first and last blocks kept), a decision
    with its table, chart and generations; one registered version, found again by a retry."""
    import json

    import mlflow

    from qat_tasks import pipeline

    decision = _of(dag_run, "llm_4bit_challenger", "fallback-llm")
    assert decision["registered_version"] == "1" and decision["method"] in {"rtn", "gptq-domain", "awq-domain-keep0_-1"}
    exp = mlflow_client.get_experiment_by_name("mangaassist-fallback-llm")
    runs = mlflow_client.search_runs([exp.experiment_id], f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    stages = sorted(r.data.tags.get("stage", "parent") for r in runs)
    assert stages == ["llm-candidate"] * 3 + ["llm-decision", "llm-unquantized", "parent"]
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    unq = by_stage["llm-unquantized"]
    sens = mlflow.artifacts.load_dict(f"runs:/{unq.info.run_id}/sensitivity.json")
    assert [r["unit"] for r in sens["rows"]] == ["block 0", "block 1", "block 2", "block 3", "lm_head"]
    dec = by_stage["llm-decision"]
    files = {f.path for f in mlflow_client.list_artifacts(dec.info.run_id)} | \
        {f.path for f in mlflow_client.list_artifacts(dec.info.run_id, "plots")}
    assert {"comparison.json", "comparison.md", "gates.json", "generations.md", "plots/perplexity_vs_size.png"} <= files
    for r in runs:
        if r.data.tags.get("stage") == "llm-candidate":
            m = r.data.metrics
            assert m["perplexity_generic"] > 0 and 0 <= m["routing_accuracy"] <= 1 and m["size_mb"] > 0
            layout = mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/layout.json")
            assert set(layout["group_sizes"].values()) == {128}  # width 128 and 256: no fallback needed
            kept = layout["kept"]
            assert "lm_head" in kept
            if r.data.tags["candidate"] == "awq-domain-keep0_-1":
                assert any("layers.0." in k for k in kept) and any("layers.3." in k for k in kept)
    # A retried task returns the decision and registers nothing new.
    (run,) = _xcom(dag_run, "plan")
    (cal,) = _xcom(dag_run, "refresh_calibration")
    assert pipeline.llm_stage(tiny_config, run, cal, "fallback-llm") == _stage(decision)
    # One version per DAG run (a later DAG run makes its own decision and may register its own).
    versions = [v for v in mlflow_client.search_model_versions("name = 'mangaassist-fallback-llm'")
                if v.tags.get("airflow.run_id") == dag_run.run_id]
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].tags["format"] == "compressed-tensors"
    assert json.loads(json.dumps(decision)) == decision  # XCom-sized, plain JSON


def test_registered_llm_generates_through_mlflow_pyfunc(dag_run):
    import mlflow.pyfunc
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/mangaassist-fallback-llm@challenger")
    out = model.predict(pd.DataFrame({"prompt": ["is volume 3 in stock?"]}), params={"max_new_tokens": 4})
    assert list(out.columns) == ["completion"] and isinstance(out["completion"][0], str)


def test_report_carries_the_memory_budget(dag_run, mlflow_client):
    (report,) = _xcom(dag_run, "report")
    budget = report["memory_budget"]
    assert budget["summary"] and "production Llama 3 8B" in budget["summary"]
    exp = mlflow_client.get_experiment_by_name("mangaassist-memory-budget")
    (run,) = mlflow_client.search_runs([exp.experiment_id], f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    assert {"memory_budget.md", "memory_budget.json"} <= {f.path for f in mlflow_client.list_artifacts(run.info.run_id)}
    assert {m["name"] for m in budget["models"]} == {"intent-classifier", "escalation-detector", "reranker",
                                                     "fallback-llm"}


def test_memory_budget_of_a_partial_run_reads_the_other_models_from_the_registry(dag_run, tiny_config):
    """A run that touched no model (say, a drift run for one encoder) still budgets the whole stack: the
    others count with what their aliases serve."""
    from qat_tasks.core.tracking import RunContext
    from qat_tasks.reporting.run_report import log_memory_budget

    (cal,) = _xcom(dag_run, "refresh_calibration")
    out = log_memory_budget(tiny_config, RunContext("t", "budget-only", "budget", "test"), cal, [], [], [])
    rows = {m["name"]: m for m in out["models"]}
    assert set(rows) == {"intent-classifier", "escalation-detector", "reranker", "fallback-llm"}
    assert rows["fallback-llm"]["precision"] == "registered @challenger" and rows["fallback-llm"]["mb"] > 1
    assert all(m["mb"] > 0 for m in rows.values())


def test_a_run_for_the_llm_alone_skips_the_encoders_and_still_reports(dag_run, mlflow_client):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).dags["quarterly_recalibration"]
    dr = dag.test(run_conf={**CONF, "reason": "requantize the LLM", "models": ["fallback-llm"]},
                  logical_date=datetime(2026, 7, 18, tzinfo=UTC))
    assert dr.state == "success"
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["report"] == "success" and states["int8_challenger"] == "skipped"
    (report,) = _xcom(dr, "report")
    assert report["evaluated"] == ["fallback-llm"]
    # The budget still covers the encoders, through what their aliases serve.
    assert {m["name"] for m in report["memory_budget"]["models"]} == {"intent-classifier", "escalation-detector",
                                                                      "reranker", "fallback-llm"}


def test_the_llm_bit_allocation_probe_reads_selection_text_only(dag_run, tiny_config):
    """The per-block sensitivity that allocates 8-bit layers is measured on selection articles: it is the start of
    the selection split's generic windows and shares no window with the judging text."""
    from transformers import AutoTokenizer

    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm.measurement import load_data

    (cal,) = _xcom(dag_run, "refresh_calibration")
    mcfg = tiny_config.model("fallback-llm")
    base = llm_model.resolve_llm(tiny_config, mcfg.source)
    data = load_data(tiny_config, mcfg.llm_track, cal["uri"], AutoTokenizer.from_pretrained(base))
    probe, selection, judging = data.sensitivity_windows.ids, data.generic_windows.ids, data.judging().generic_windows.ids
    assert probe.shape[0] >= 1 and (probe == selection[:probe.shape[0]]).all()
    assert not {tuple(w.tolist()) for w in probe} & {tuple(w.tolist()) for w in judging}
