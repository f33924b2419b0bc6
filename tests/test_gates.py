import numpy as np

from qat_tasks.config import EncoderGates
from qat_tasks.gates import encoder_gates, summarize
from qat_tasks.metrics import expected_calibration_error, fit_temperature, softmax_t

CHAMP = {"accuracy": 0.921, "rare_class_accuracy": 0.886, "escalation_recall": 0.90, "ece_after_ts": 0.03, "p95_ms": 12.0}


def test_seed_gate_example_passes_and_fails_where_the_seeds_say():
    ok = {"accuracy": 0.918, "rare_class_accuracy": 0.880, "escalation_recall": 0.896, "ece_after_ts": 0.035,
          "p95_ms": 8.0}
    assert all(r.passed for r in encoder_gates(ok, CHAMP, EncoderGates(), True, 0.99, 0.97))
    bad = {**ok, "rare_class_accuracy": 0.85, "p95_ms": 9.5}
    results = {r.gate: r for r in encoder_gates(bad, CHAMP, EncoderGates(), False, 0.5, 0.97)}
    assert results["rare_class_accuracy"].failure_mode == "rare-class collapse"
    assert results["p95_ratio"].failure_mode == "latency gain too small"
    assert results["parity"].failure_mode == "operator mismatch"
    assert "focal loss" in summarize(list(results.values()))


def test_confidence_shift_is_named():
    shifted = {**CHAMP, "ece_after_ts": 0.05, "p95_ms": 6.0}
    (ece,) = [r for r in encoder_gates(shifted, CHAMP, EncoderGates(), True, 1.0, 0.97) if r.gate == "ece_after_ts"]
    assert not ece.passed and ece.failure_mode == "confidence shift"


def test_temperature_scaling_repairs_an_overconfident_model():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 4000)
    logits = rng.normal(size=(4000, 10))
    logits[np.arange(4000), y] += 1.5
    over = logits * 4  # same ranking, far too confident
    t = fit_temperature(over[:2000], y[:2000])
    before = softmax_t(over[2000:])
    after = softmax_t(over[2000:], t)
    correct = before.argmax(1) == y[2000:]
    assert t > 2  # the model was made ~4x too confident; the fit undoes most of it
    assert expected_calibration_error(after.max(1), correct) < expected_calibration_error(before.max(1), correct) / 3


def test_method_rule_follows_the_seeds_and_config_overrides_it():
    from qat_tasks.challenger import PTQ_BASELINES, choose_candidates
    from qat_tasks.config import QuantizationConfig

    auto = QuantizationConfig()
    qat, why = choose_candidates(auto, 0.3, reviewed_fraction=0.35)
    assert qat[-2:] == ("qat_static", "qat_dynamic") and "QAT" in why
    distill, why = choose_candidates(auto, 0.3, reviewed_fraction=0.05)
    assert distill[-2:] == ("qat_distill_static", "qat_distill_dynamic") and "distillation" in why
    assert choose_candidates(auto, 1.5, reviewed_fraction=1.0)[0] == PTQ_BASELINES
    assert set(PTQ_BASELINES) <= set(qat)  # baselines are always measured for comparison
    fixed = QuantizationConfig(candidates=("ptq_dynamic",))
    assert choose_candidates(fixed, 0.3, 1.0) == (("ptq_dynamic",), "configured")
