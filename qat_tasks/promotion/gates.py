"""Promotion gates: a candidate against the champion, measured on the same data in the same runtime.

A failed gate names the failure mode and the usual fix, so the MLflow run says what to do
next, not only that something is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qat_tasks.core.config_operations import (
    EncoderGates,
    EscalationGates,
    LlmGates,
    RerankerGates,
    ShadowConfig,
)

FAILURE_MODES = {
    "accuracy": ("accuracy loss",
                 "use QAT instead of PTQ, or keep the most sensitive layers in FP32 (mixed precision)"),
    "rare_class_accuracy": ("rare-class collapse",
                            "QAT with focal loss and class weights; oversample rare intents in the calibration set"),
    "escalation_recall": ("rare-class collapse (escalation)",
                          "QAT with class weights; tune the escalation threshold for recall"),
    "ece_after_ts": ("confidence shift",
                     "refit temperature scaling on the quantized model, or distil from the FP32 teacher"),
    "p95_ratio": ("latency gain too small",
                  "quantize MatMul per-tensor (U8S8) and check that ONNX Runtime fused the QDQ pairs"),
    "escalation_precision": ("false alarms (escalation)",
                             "QAT or distillation from the FP32 teacher; the threshold for the recall target is "
                             "too low on this candidate"),
    "ndcg_at_10": ("ranking loss",
                   "QAT on the reranking pairs, or keep the most sensitive layers in FP32 (mixed precision)"),
    "mrr_at_10": ("ranking loss (top hit)",
                  "QAT on the reranking pairs, or keep the most sensitive layers in FP32 (mixed precision)"),
    "perplexity_generic": ("language-modelling loss",
                           "AWQ or GPTQ instead of round-to-nearest; keep the most sensitive blocks in 16-bit "
                           "(mixed precision, see the sensitivity report); a smaller group size"),
    "perplexity_domain": ("domain loss (MangaAssist conversations)",
                          "calibrate on more, or more recent, MangaAssist conversations; keep the most sensitive "
                          "blocks in 16-bit"),
    "routing_accuracy": ("intent-routing loss",
                         "calibrate on conversations covering every intent; keep the first and last blocks and "
                         "lm_head in 16-bit"),
    "macro_f1": ("minority-intent loss",
                 "QAT with focal loss and class weights; check the per-class recall of the review"),
    "ece": ("confidence shift on live traffic",
            "refit temperature scaling on the quantized model, or distil from the FP32 teacher"),
    "agreement": ("disagrees with the champion on live traffic",
                  "read the per-class disagreement of the review; recalibrate on recent logs if live traffic has "
                  "moved away from the calibration set"),
    "shadow_error_rate": ("unreliable in serving",
                          "read the service's /metrics: errors are exceptions, timeouts are answers later than "
                          "serving.shadow_timeout_ms, drops are a full mirror queue"),
    "parity": ("operator mismatch",
               "exclude the mismatching nodes from quantization, or update the opset / ONNX Runtime"),
}


@dataclass(frozen=True)
class GateResult:
    gate: str
    passed: bool
    candidate: float
    champion: float
    limit: str
    failure_mode: str = ""
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _result(gate: str, passed: bool, cand: float, champ: float, limit: str) -> GateResult:
    mode, fix = FAILURE_MODES[gate] if not passed else ("", "")
    return GateResult(gate, bool(passed), float(cand), float(champ), limit, mode, fix)


def _parity(parity_ok: bool, agreement: float, min_agreement: float, measure: str = "top-1 agreement") -> GateResult:
    return _result("parity", parity_ok, agreement, 1.0, f">= {min_agreement:.3f} {measure} with the PyTorch model "
                                                        f"it came from")


def _drop_pts(key: str, candidate: dict, champion: dict, limit: float) -> GateResult:
    drop_pts = 100 * (champion[key] - candidate[key])
    return _result(key, drop_pts <= limit + 1e-9, candidate[key], champion[key], f"drop <= {limit} pts (was {drop_pts:+.2f})")


def _ece(candidate: dict, champion: dict, max_increase: float) -> GateResult:
    return _result("ece_after_ts", candidate["ece_after_ts"] <= champion["ece_after_ts"] + max_increase,
                   candidate["ece_after_ts"], champion["ece_after_ts"], f"<= champion + {max_increase}")


def _latency(candidate: dict, champion: dict, max_ratio: float) -> GateResult:
    ratio = candidate["p95_ms"] / champion["p95_ms"]
    return _result("p95_ratio", ratio <= max_ratio, candidate["p95_ms"], champion["p95_ms"],
                   f"P95 <= {max_ratio:.3f} x champion (was {ratio:.3f})")


def encoder_gates(candidate: dict, champion: dict, gates: EncoderGates, parity_ok: bool, agreement: float,
                  min_agreement: float) -> list[GateResult]:
    """Intent-classifier gates; metrics are fractions, limits in percentage points where the gate says so."""
    out = [_parity(parity_ok, agreement, min_agreement)]
    for key, limit in (("accuracy", gates.max_accuracy_drop_pts),
                       ("rare_class_accuracy", gates.max_rare_class_accuracy_drop_pts),
                       ("escalation_recall", gates.max_escalation_recall_drop_pts)):
        if key in champion and key in candidate:
            out.append(_drop_pts(key, candidate, champion, limit))
    return [*out, _ece(candidate, champion, gates.max_ece_increase), _latency(candidate, champion, gates.max_p95_ratio)]


def escalation_gates(candidate: dict, champion: dict, gates: EscalationGates, parity_ok: bool, agreement: float,
                     min_agreement: float) -> list[GateResult]:
    """Escalation detector: recall of frustrated customers, each model at its own recall-tuned threshold, must
    not drop (default 0 points); precision may give a little; calibration and latency as for the classifier."""
    return [_parity(parity_ok, agreement, min_agreement),
            _drop_pts("escalation_recall", candidate, champion, gates.max_recall_drop_pts),
            _drop_pts("escalation_precision", candidate, champion, gates.max_precision_drop_pts),
            _ece(candidate, champion, gates.max_ece_increase), _latency(candidate, champion, gates.max_p95_ratio)]


def reranker_gates(candidate: dict, champion: dict, gates: RerankerGates, parity_ok: bool, agreement: float,
                   min_agreement: float) -> list[GateResult]:
    """Reranker: NDCG@10 and MRR@10 each drop at most `max_*_drop` (absolute), P95 at least 30 % better.
    Parity is the rank correlation of relevance scores: near-tied pairs flip their argmax under any noise."""
    out = [_parity(parity_ok, agreement, min_agreement, "rank correlation of scores")]
    for key, limit in (("ndcg_at_10", gates.max_ndcg10_drop), ("mrr_at_10", gates.max_mrr10_drop)):
        drop = champion[key] - candidate[key]
        out.append(_result(key, drop <= limit + 1e-9, candidate[key], champion[key], f"drop <= {limit} (was {drop:+.4f})"))
    return [*out, _latency(candidate, champion, gates.max_p95_ratio)]


def llm_gates(candidate: dict, base: dict, gates: LlmGates) -> list[GateResult]:
    """A 4-bit LLM against its unquantized self: perplexity on each held-out text may rise by at most
    `max_perplexity_increase_rel` (relative), intent-routing accuracy may drop at most the given points."""
    out = []
    for key in ("perplexity_generic", "perplexity_domain"):
        if key in candidate and key in base:
            rel = candidate[key] / base[key] - 1
            out.append(_result(key, rel <= gates.max_perplexity_increase_rel + 1e-12, candidate[key], base[key],
                               f"increase <= {100 * gates.max_perplexity_increase_rel:.1f} % (was {100 * rel:+.2f} %)"))
    return [*out, _drop_pts("routing_accuracy", candidate, base, gates.max_routing_accuracy_drop_pts)]


def shadow_gates(shadow: dict, champion: dict, cfg: ShadowConfig, quality: EncoderGates) -> list[GateResult]:
    """A shadow against the champion on the same mirrored requests: agreement, reliability and P95 always; the
    quality gates of the offline decision on the reviewed labels that arrived (`shadow` holds what was measured)."""
    out = [_result("agreement", shadow["agreement"] >= cfg.min_agreement, shadow["agreement"], 1.0,
                   f">= {cfg.min_agreement:.3f} of answers equal to the champion's"),
           _result("shadow_error_rate", shadow["error_rate"] <= cfg.max_shadow_error_rate + 1e-12,
                   shadow["error_rate"], 0.0, f"<= {cfg.max_shadow_error_rate:.3f} of mirrored requests unanswered"),
           _latency(shadow, champion, cfg.max_p95_ratio)]
    if "accuracy" in shadow:
        for key, limit in (("accuracy", quality.max_accuracy_drop_pts),
                           ("rare_class_accuracy", quality.max_rare_class_accuracy_drop_pts),
                           ("escalation_recall", quality.max_escalation_recall_drop_pts),
                           ("macro_f1", quality.max_accuracy_drop_pts)):
            if all(key in m and m[key] == m[key] for m in (shadow, champion)):  # NaN: no reviewed rows of it
                out.append(_drop_pts(key, shadow, champion, limit))
        out.append(_result("ece", shadow["ece"] <= champion["ece"] + quality.max_ece_increase, shadow["ece"],
                           champion["ece"], f"<= champion + {quality.max_ece_increase}"))
    return out


def summarize(results: list[GateResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        return "all gates passed"
    return "; ".join(f"{r.gate} failed ({r.limit}): {r.failure_mode} -> {r.fix}" for r in failed)
