import numpy as np
import pytest

from qat_tasks.core.config_operations import EncoderGates
from qat_tasks.core.metrics import expected_calibration_error, fit_temperature, softmax_t
from qat_tasks.promotion.gates import encoder_gates, summarize

CHAMP = {"accuracy": 0.921, "rare_class_accuracy": 0.886, "escalation_recall": 0.90, "ece_after_ts": 0.03, "p95_ms": 12.0}


def test_intent_gates_pass_and_fail_at_their_tolerances():
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


def test_candidate_rule_follows_tolerance_and_labels_and_config_overrides_it():
    from qat_tasks.core.config_sections import QuantizationConfig
    from qat_tasks.encoders.int8.track import BASELINE, PTQ_BASELINES, choose_candidates

    auto = QuantizationConfig()
    qat, why = choose_candidates(auto, 0.3, reviewed_fraction=0.35)
    assert qat == (BASELINE, "qat_static", "qat_dynamic") and "QAT" in why
    distill, why = choose_candidates(auto, 0.3, reviewed_fraction=0.05)
    assert distill == (BASELINE, "qat_distill_static", "qat_distill_dynamic") and "distillation" in why
    assert choose_candidates(auto, 1.5, reviewed_fraction=1.0)[0] == (BASELINE, "ptq_static_percentile")
    everything = QuantizationConfig(candidate_set="all")
    full, why = choose_candidates(everything, 0.3, reviewed_fraction=0.35)
    assert full[:4] == PTQ_BASELINES and full[4:] == ("qat_static", "qat_dynamic") and "every PTQ" in why
    assert choose_candidates(everything, 1.5, 1.0)[0] == PTQ_BASELINES  # percentile once, not twice
    fixed = QuantizationConfig(candidates=("ptq_dynamic",))
    assert choose_candidates(fixed, 0.3, 1.0) == (("ptq_dynamic",), "configured")


def test_escalation_detector_may_not_lose_recall_but_may_give_a_little_precision():
    from qat_tasks.core.config_operations import EscalationGates
    from qat_tasks.promotion.gates import escalation_gates

    champ = {"escalation_recall": 0.95, "escalation_precision": 0.80, "ece_after_ts": 0.04, "p95_ms": 12.0}
    ok = {**champ, "escalation_precision": 0.78, "p95_ms": 7.5}
    assert all(r.passed for r in escalation_gates(ok, champ, EscalationGates(), True, 0.99, 0.97))
    missed = {**ok, "escalation_recall": 0.9483}  # one frustrated customer in 300 missed
    strict = EscalationGates(max_recall_drop_pts=0.0)
    results = {r.gate: r for r in escalation_gates(missed, champ, strict, True, 0.99, 0.97)}
    assert not results["escalation_recall"].passed
    assert results["escalation_recall"].failure_mode == "rare-class collapse (escalation)"
    noisy = {**ok, "escalation_precision": 0.70}
    (prec,) = [r for r in escalation_gates(noisy, champ, EscalationGates(), True, 0.99, 0.97)
               if r.gate == "escalation_precision"]
    assert not prec.passed and "threshold" in prec.fix


def test_reranker_gates_use_absolute_ndcg_and_mrr_drops_and_a_30_percent_latency_gain():
    from qat_tasks.core.config_operations import RerankerGates
    from qat_tasks.promotion.gates import reranker_gates

    champ = {"ndcg_at_10": 0.80, "mrr_at_10": 0.74, "p95_ms": 10.0}
    ok = {"ndcg_at_10": 0.791, "mrr_at_10": 0.731, "p95_ms": 7.0}
    assert all(r.passed for r in reranker_gates(ok, champ, RerankerGates(), True, 0.99, 0.97))
    bad = {"ndcg_at_10": 0.785, "mrr_at_10": 0.74, "p95_ms": 7.5}
    results = {r.gate: r for r in reranker_gates(bad, champ, RerankerGates(), True, 0.99, 0.97)}
    assert not results["ndcg_at_10"].passed and results["ndcg_at_10"].failure_mode == "ranking loss"
    assert results["mrr_at_10"].passed
    assert not results["p95_ratio"].passed and results["p95_ratio"].failure_mode == "latency gain too small"


def test_ranking_metrics_rank_ties_pessimistically():
    from qat_tasks.core.metrics import ranking_metrics

    groups = ["a"] * 3 + ["b"] * 3 + ["c"] * 12
    relevant = np.array([1, 0, 0, 0, 1, 0] + [1] + [0] * 11)
    scores = np.array([3.0, 1.0, 2.0,   # a: rank 1
                       5.0, 4.0, 1.0,   # b: rank 2
                       0.0] + [1.0] * 11)  # c: rank 12, outside the top 10
    m = ranking_metrics(scores, groups, relevant, k=10)
    assert m["mrr_at_10"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["ndcg_at_10"] == pytest.approx((1 + 1 / np.log2(3) + 0) / 3)
    assert m["hit_at_1"] == pytest.approx(1 / 3) and m["groups"] == 3
    flat = ranking_metrics(np.zeros(3), ["g"] * 3, np.array([0, 1, 0]))
    assert flat["mrr_at_10"] == pytest.approx(1 / 3), "a model that scores everything alike earns the worst rank"
    with pytest.raises(ValueError, match="exactly one"):
        ranking_metrics(np.zeros(2), ["g", "g"], np.array([1, 1]))


def test_recall_threshold_reaches_the_target_on_held_out_rows():
    from qat_tasks.core.metrics import recall_threshold, threshold_report

    rng = np.random.default_rng(0)
    n = 20000
    y = rng.random(n) < 0.2
    p = np.clip(np.where(y, rng.normal(0.7, 0.2, n), rng.normal(0.3, 0.2, n)), 0, 1)
    t = recall_threshold(p[: n // 2], y[: n // 2], 0.95)
    assert threshold_report(p[: n // 2], y[: n // 2], t)["recall"] >= 0.95
    held_out = threshold_report(p[n // 2:], y[n // 2:], t)
    assert 0.93 <= held_out["recall"] <= 0.97  # argmax (0.5) would catch only about 84 %
    assert t < 0.5, "recall first: the threshold sits below the argmax boundary"


def test_reranker_parity_is_rank_correlation_not_argmax_agreement(tiny_config):
    from qat_tasks.encoders.roles import RerankerRole

    role = RerankerRole(tiny_config, "reranker")
    rng = np.random.default_rng(3)
    ref = np.stack([np.zeros(400), rng.normal(0, 0.05, 400)], axis=1)  # near-tied pairs, as a weak reranker has
    noisy = ref + rng.normal(0, 0.006, ref.shape)                       # quantization-sized noise
    assert (noisy.argmax(1) == ref.argmax(1)).mean() < 0.97 <= role.parity(noisy, ref)
    scrambled = ref[rng.permutation(400)]                                 # what an operator mismatch does
    assert role.parity(scrambled, ref) < 0.5


def test_llm_gates_are_relative_to_the_unquantized_model():
    from qat_tasks.core.config_operations import LlmGates
    from qat_tasks.promotion.gates import llm_gates

    base = {"perplexity_generic": 20.0, "perplexity_domain": 10.0, "routing_accuracy": 0.60}
    ok = {"perplexity_generic": 20.9, "perplexity_domain": 10.4, "routing_accuracy": 0.585}
    assert all(r.passed for r in llm_gates(ok, base, LlmGates()))
    bad = {"perplexity_generic": 21.2, "perplexity_domain": 10.2, "routing_accuracy": 0.57}
    results = {r.gate: r for r in llm_gates(bad, base, LlmGates())}
    assert not results["perplexity_generic"].passed and "+0.060" in results["perplexity_generic"].limit
    assert results["perplexity_domain"].passed
    assert not results["routing_accuracy"].passed and results["routing_accuracy"].failure_mode == "intent-routing loss"
    assert "16-bit" in summarize(list(results.values()))
