"""Paired non-inferiority gates: intervals that know their uncertainty, insufficient evidence with the rows it
lacks, the configured fallback, and latency timed interleaved."""

import numpy as np
import pytest

from qat_tasks.core.config_operations import EncoderGates
from qat_tasks.core.metrics import classification_report, expected_calibration_error
from qat_tasks.promotion import evidence
from qat_tasks.promotion.gates import Pairing, encoder_gates, weighted_ece, weighted_macro_f1

LABELS = ["a", "b", "rare"]


def _outcomes(y, pred, conf=None):
    y, pred = np.asarray(y), np.asarray(pred)
    conf = np.full(len(y), 0.9) if conf is None else np.asarray(conf)
    return {"y": y, "pred": pred, "conf_t": conf, "ece_bins": 10, "rare_mask": y == 2}


def _metrics(o):
    correct = o["pred"] == o["y"]
    return {"accuracy": correct.mean(), "rare_class_accuracy": correct[o["rare_mask"]].mean(),
            "ece_after_ts": expected_calibration_error(o["conf_t"], correct.astype(float), 10), "p95_ms": 1.0}


def _gates(cand, champ, j, tolerance_pts=1.0):
    cfg = EncoderGates(max_accuracy_drop_pts=tolerance_pts, max_rare_class_accuracy_drop_pts=5.0,
                       max_ece_increase=0.05, max_p95_ratio=10.0)
    return {r.gate: r for r in encoder_gates(_metrics(cand), _metrics(champ), cfg, True, 1.0, 0.97,
                                             Pairing(cand, champ, j), "rare")}


def _rows(n, wrong_champ, lost, gained, seed=0):
    """n rows; the champion wrong on `wrong_champ` of them; the candidate additionally wrong on `lost` rows the
    champion got right and right on `gained` rows the champion got wrong."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    champ = y.copy()
    order = rng.permutation(n)
    champ_wrong, right = order[:wrong_champ], order[wrong_champ:]
    champ[champ_wrong] = (y[champ_wrong] + 1) % 3
    cand = champ.copy()
    cand[right[:lost]] = (y[right[:lost]] + 1) % 3
    cand[champ_wrong[:gained]] = y[champ_wrong[:gained]]
    return _outcomes(y, cand), _outcomes(y, champ)


def test_identical_answers_pass_with_a_zero_width_interval():
    cand, champ = _rows(600, 60, 0, 0)
    acc = _gates(cand, champ, evidence.Judgement(seed=1))["accuracy"]
    assert acc.verdict == evidence.PASS and acc.passed and (acc.low, acc.high, acc.loss) == (0.0, 0.0, 0.0)
    assert acc.decided_by == "95 % interval" and acc.units == 600 and acc.unit == "reviewed rows"


def test_a_clear_loss_fails_on_its_interval_not_on_noise():
    cand, champ = _rows(2000, 200, 80, 0)  # 4 points lost
    acc = _gates(cand, champ, evidence.Judgement(seed=1))["accuracy"]
    assert acc.verdict == evidence.FAIL and not acc.passed
    assert acc.low > 1.0 and acc.loss == pytest.approx(4.0)
    assert "accuracy loss" in acc.failure_mode


def test_rows_that_cannot_resolve_the_tolerance_say_so_and_how_many_more_would():
    cand, champ = _rows(300, 30, 3, 1)  # net 2 rows lost of 300: 0.67 points, tolerance 1 point
    block = _gates(cand, champ, evidence.Judgement(seed=1))["accuracy"]
    assert block.verdict == evidence.INSUFFICIENT and not block.passed
    assert block.low < 1.0 < block.high and block.more_units and block.more_units > 0
    assert block.failure_mode.startswith("insufficient evidence") and "more reviewed rows" in block.limit
    assert block.decided_by == "blocked (insufficient evidence)"
    exploratory = _gates(cand, champ, evidence.Judgement(seed=1, on_insufficient="point_rule"))["accuracy"]
    assert exploratory.passed and exploratory.decided_by == "point rule (insufficient evidence)"
    # The same outcomes, repeated until there are about as many rows as the gate asked for, settle it.
    k = int(np.ceil((300 + block.more_units) / 300)) + 1
    big = [{key: (np.tile(v, k) if isinstance(v, np.ndarray) else v) for key, v in o.items()} for o in (cand, champ)]
    assert _gates(*big, evidence.Judgement(seed=1))["accuracy"].verdict == evidence.PASS


def test_the_rare_class_gate_counts_rare_rows_and_asks_for_rare_rows():
    cand, champ = _rows(400, 40, 6, 0)
    rare = _gates(cand, champ, evidence.Judgement(seed=3))["rare_class_accuracy"]
    assert rare.units == int((champ["y"] == 2).sum()) and rare.unit == "rare-class rows (rare)"


def test_weighted_metrics_at_unit_weights_are_the_plain_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 500)
    probs = rng.dirichlet(np.ones(3), 500)
    rep = classification_report(y, probs, LABELS, ["rare"], 10)
    o = _outcomes(y, probs.argmax(1), probs.max(1))
    ones = np.ones((1, 500))
    assert weighted_macro_f1(o, 3, ones)[0] == pytest.approx(rep["macro_f1"])
    assert weighted_ece(o["conf_t"], (o["pred"] == y).astype(float), 10, ones)[0] == pytest.approx(rep["ece"])


def test_resample_weights_draw_every_row_set_with_replacement():
    w = evidence.resample_weights(50, 300, 7)
    assert w.shape == (300, 50) and (w.sum(axis=1) == 50).all() and (w == 0).any()
    assert np.array_equal(w, evidence.resample_weights(50, 300, 7))


def test_latency_rounds_interleave_the_models_and_the_ratio_is_judged_with_its_interval():
    calls = []
    rounds = evidence.interleaved_latency({"champion": lambda b: calls.append(("champion", b[0])),
                                           "candidate": lambda b: calls.append(("candidate", b[0]))},
                                          ["a", "b", "c"], rounds=4, per_round=3, warmup=1)
    assert [len(r) for r in rounds["champion"]] == [3] * 4 and [len(r) for r in rounds["candidate"]] == [3] * 4
    timed = calls[2:]  # after one warm-up call each
    # Each round times both models on the same requests, and the order of models alternates between rounds.
    assert [m for m, _ in timed[0:6:3]] == ["champion", "candidate"]
    assert [m for m, _ in timed[6:12:3]] == ["candidate", "champion"]
    assert [x for m, x in timed[:6] if m == "champion"] == [x for m, x in timed[:6] if m == "candidate"]
    # Synthetic timings: the ratio's interval is judged against the maximum ratio.
    rng = np.random.default_rng(0)
    champ = [rng.normal(10, 0.5, 10) for _ in range(20)]
    j = evidence.Judgement(seed=0)
    fast = evidence.latency_ratio(champ, [c * 0.5 for c in champ], 0.8, j)
    assert fast.verdict == evidence.PASS and fast.high < 0.8 and fast.unit == "timing rounds"
    same = evidence.latency_ratio(champ, champ, 0.8, j)
    assert same.verdict == evidence.FAIL and same.estimate == pytest.approx(1.0)
    noisy = [c * rng.choice([0.6, 1.2], 10) for c in champ]
    at = evidence.latency_ratio(champ, noisy, 10.0, j).estimate
    on_the_line = evidence.latency_ratio(champ, noisy, at, j)  # a ratio right at its maximum: cannot tell
    assert on_the_line.verdict == evidence.INSUFFICIENT and on_the_line.more_units is None


def test_more_units_needed_follows_the_square_root_law():
    # Half-width 2 at 100 units around an estimate 1 below the tolerance: 4x the units halve it to 1.
    assert evidence.more_units_needed(100, 0.0, -2.0, 2.0, 1.0) == 300
    assert evidence.more_units_needed(100, 1.0, -1.0, 3.0, 1.0) is None  # on the tolerance: no count settles it


def test_the_run_report_prints_each_gate_with_its_interval_and_verdict():
    from qat_tasks.promotion.gates import table
    from qat_tasks.reporting.run_report import gate_lines

    cand, champ = _rows(300, 30, 3, 1)
    results = list(_gates(cand, champ, evidence.Judgement(seed=1)).values())
    lines = gate_lines({"gates": table("ptq_dynamic", results)})
    (acc,) = [line for line in lines if " accuracy:" in line]
    assert "ptq_dynamic accuracy: loss +0.667 [" in acc and "vs tolerance 1 on 300 reviewed rows" in acc
    assert acc.endswith("more reviewed rows") and "insufficient evidence" in acc
    assert not any(" parity:" in line for line in lines)  # a check, not a statistic


def test_a_decision_the_rows_cannot_settle_registers_nothing_and_says_what_is_missing(tmp_path):
    """decision.judged on a real MLflow run: blocked on insufficient evidence (the default), or passed on the
    point rule when a run is configured exploratory, and recorded either way."""
    import mlflow

    from qat_tasks.promotion import decision

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        _judge_and_record(mlflow, decision)
    finally:
        mlflow.set_tracking_uri(before)


def _judge_and_record(mlflow, decision):
    cand, champ = _rows(300, 30, 3, 1)
    blocked = list(_gates(cand, champ, evidence.Judgement(seed=1)).values())
    with mlflow.start_run() as run:
        out = decision.judged("intent-classifier", "ptq_dynamic", blocked, run.info.run_id)
    assert out["registered_version"] is None and out["decision"] == "finalist ptq_dynamic: insufficient evidence"
    assert out["insufficient_evidence"]["accuracy"]["unit"] == "reviewed rows"
    assert out["insufficient_evidence"]["accuracy"]["more_units"] > 0
    tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["decision"].startswith("finalist ptq_dynamic: insufficient evidence")
    assert "insufficient evidence" in tags["decision.why"] and "more reviewed rows" in tags["decision.why"]

    exploratory = list(_gates(cand, champ, evidence.Judgement(seed=1, on_insufficient="point_rule")).values())
    with mlflow.start_run() as run:
        assert decision.judged("intent-classifier", "ptq_dynamic", exploratory, run.info.run_id) is None
    assert "accuracy" in mlflow.get_run(run.info.run_id).data.tags["decision.point_rule_gates"]
    assert decision.gate_tags(exploratory)["gates.point_rule"].startswith("accuracy")
