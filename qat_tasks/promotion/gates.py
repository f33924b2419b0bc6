"""Promotion gates: a candidate against the champion, measured on the same data in the same runtime.

A failed gate names the failure mode and the usual fix, so the MLflow run says what to do
next, not only that something is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from qat_tasks.core.config_operations import (
    EncoderGates,
    EscalationGates,
    GatesConfig,
    LlmGates,
    RerankerGates,
    ShadowConfig,
)
from qat_tasks.promotion import evidence

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
                           "GPTQ or AutoRound on rotated weights (rotation: spinquant) instead of round-to-nearest; "
                           "asymmetric groups of 64; 8-bit weights for the most sensitive layers (average_bits, "
                           "see the bit allocation and the sensitivity report)"),
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
    "overlap_at_k": ("reorders the champion's top passages on live traffic",
                     "read the review's top-1 agreement and overlap@k; recalibrate the reranker on recent queries and "
                     "passages, or keep its most sensitive layers in FP32"),
    "shadow_error_rate": ("unreliable in serving",
                          "read the service's /metrics: errors are exceptions, timeouts are answers later than "
                          "serving.shadow_timeout_ms, drops are a full mirror queue"),
    "average_bits": ("over the memory budget",
                     "a lower average_bits for the allocator, fewer 16-bit blocks (keep_blocks), or groups of 128"),
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
    # The loss the gate judges (points lost, relative increase, P95 ratio), its interval and the verdict.
    loss: float = float("nan")
    low: float | None = None
    high: float | None = None
    tolerance: float = float("nan")
    verdict: str = evidence.POINT_PASS
    units: int = 0
    unit: str = ""
    more_units: int | None = None
    decided_by: str = "point rule"

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def insufficient(self) -> bool:
        return self.verdict == evidence.INSUFFICIENT


def judgement_of(gc: GatesConfig, seed: int) -> evidence.Judgement:
    return evidence.Judgement(gc.confidence, gc.bootstrap_resamples, seed, gc.on_insufficient_evidence)


@dataclass(frozen=True)
class Pairing:
    """Per-unit outcomes of candidate and champion on the same units (`outcomes` of the role), how to weigh
    them, and latency rounds that interleaved the two; None where a gate is a point rule (the selection screen)."""

    candidate: dict
    champion: dict
    judgement: evidence.Judgement
    latency: tuple[list, list] | None = None  # (champion rounds, candidate rounds), ms


def _judged(gate: str, cand: float, champ: float, tolerance: float, describe: str, loss: float,
            ev: evidence.Evidence | None, j: evidence.Judgement | None, units: int = 0, unit: str = "") -> GateResult:
    """A gate's result: the paired evidence when there is some, else the point rule on `loss`."""
    point_ok = loss <= tolerance + 1e-9
    if ev is None:
        ev = evidence.point(loss, tolerance, units, unit)
        passed, by = point_ok, "point rule"
    elif ev.verdict == evidence.INSUFFICIENT:
        by = "point rule (insufficient evidence)" if j.on_insufficient == "point_rule" else "blocked (insufficient evidence)"
        passed = point_ok and j.on_insufficient == "point_rule"
    else:
        passed, by = ev.verdict == evidence.PASS, f"{100 * ev.level:g} % interval"
    interval = "" if ev.low is None else f", {100 * ev.level:g} % CI [{ev.low:+.3f}, {ev.high:+.3f}]"
    more = ""
    if ev.verdict == evidence.INSUFFICIENT:
        more = (f"; about {ev.more_units} more {ev.unit} would settle it" if ev.more_units is not None else
                f"; the estimate sits on the tolerance: more {ev.unit} alone will not settle it")
    limit = f"{describe} (was {loss:+.3f}{interval}: {ev.verdict}{more})"
    mode, fix = FAILURE_MODES[gate] if not passed else ("", "")
    if not passed and ev.verdict == evidence.INSUFFICIENT:
        mode = f"insufficient evidence ({mode})"
        fix = (f"review more {ev.unit}" + (f" (about {ev.more_units} more)" if ev.more_units else "")
               + f", or, if the loss is real: {fix}")
    return GateResult(gate, bool(passed), float(cand), float(champ), limit, mode, fix, float(loss), ev.low, ev.high,
                      float(tolerance), ev.verdict, ev.units or units, ev.unit or unit, ev.more_units, by)


def _result(gate: str, passed: bool, cand: float, champ: float, limit: str) -> GateResult:
    """A pass/fail check with no statistics to it (parity, agreement, serving errors)."""
    mode, fix = FAILURE_MODES[gate] if not passed else ("", "")
    return GateResult(gate, bool(passed), float(cand), float(champ), limit, mode, fix,
                      verdict=evidence.POINT_PASS if passed else evidence.POINT_FAIL, decided_by="check")


def _parity(parity_ok: bool, agreement: float, min_agreement: float, measure: str = "top-1 agreement") -> GateResult:
    return _result("parity", parity_ok, agreement, 1.0, f">= {min_agreement:.3f} {measure} with the PyTorch model "
                                                        f"it came from")


# -- per-unit losses: what the paired bootstrap resamples -------------------------------------------------------

def _rate(o: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per unit of a rate metric of one model's outcomes."""
    correct = (o["pred"] == o["y"]).astype(float)
    if key == "accuracy":
        return correct, np.ones_like(correct)
    if key in ("rare_class_accuracy", "escalation_recall"):
        mask = o["rare_mask"] if key == "rare_class_accuracy" else o["escalation_mask"]
        return correct * mask, mask.astype(float)
    if key == "detector_recall":
        return (o["alarm"] & o["positive"]).astype(float), o["positive"].astype(float)
    if key == "detector_precision":
        return (o["alarm"] & o["positive"]).astype(float), o["alarm"].astype(float)
    if key == "routing_accuracy":
        return correct, np.ones_like(correct)
    raise KeyError(key)


_UNITS = {"accuracy": "reviewed rows", "escalation_recall": "escalation rows", "detector_recall": "frustrated rows",
          "detector_precision": "alarms", "routing_accuracy": "routing rows"}


def _rate_gate(gate: str, metric: str, cand: dict, champ: dict, tolerance_pts: float, pairing: Pairing | None,
               describe: str, rare: str = "") -> GateResult:
    """A rate (accuracy, recall, precision) may drop at most `tolerance_pts` points."""
    ev, units, unit = None, 0, _UNITS.get(metric, f"rare-class rows ({rare})")
    if pairing is not None:
        (cn, cd), (kn, kd) = _rate(pairing.champion, metric), _rate(pairing.candidate, metric)
        if metric != "detector_precision":  # a fixed subset of rows (rare class, escalation): resample within it
            keep = cd > 0
            cn, cd, kn, kd = cn[keep], cd[keep], kn[keep], kd[keep]
        units = int(cd.sum())
        if len(cn):
            ev = evidence.paired(lambda w: 100 * (evidence.ratio(cn, cd, w) - evidence.ratio(kn, kd, w)), len(cn),
                                 tolerance_pts, unit, pairing.judgement, units=units)
    loss = 100 * (champ[gate] - cand[gate])
    return _judged(gate, cand[gate], champ[gate], tolerance_pts, describe, loss, ev,
                   pairing.judgement if pairing else None, units, unit)


def _drop_pts(key: str, candidate: dict, champion: dict, limit: float, pairing: Pairing | None = None,
              metric: str | None = None, rare: str = "") -> GateResult:
    return _rate_gate(key, metric or key, candidate, champion, limit, pairing, f"drop <= {limit} pts", rare)


def weighted_ece(confidence: np.ndarray, correct: np.ndarray, bins: int, w: np.ndarray) -> np.ndarray:
    """Expected calibration error under unit weights w ((resamples, n) or (1, n)), equal-width bins."""
    idx = np.minimum((confidence * bins).astype(int), bins - 1)
    onehot = np.eye(bins)[idx]  # (n, bins)
    gap = (w @ (onehot * (confidence - correct)[:, None]))  # (resamples, bins): sum of conf - correct per bin
    return np.abs(gap).sum(axis=1) / w.sum(axis=1)


def _ece(candidate: dict, champion: dict, max_increase: float, pairing: Pairing | None = None,
         key: str = "ece_after_ts") -> GateResult:
    ev = None
    if pairing is not None:
        c, k = pairing.champion, pairing.candidate
        bins = int(c["ece_bins"])
        cc, kc = (c["pred"] == c["y"]).astype(float), (k["pred"] == k["y"]).astype(float)
        ev = evidence.paired(lambda w: weighted_ece(k["conf_t"], kc, bins, w) - weighted_ece(c["conf_t"], cc, bins, w),
                             len(cc), max_increase, "reviewed rows", pairing.judgement)
    return _judged(key, candidate[key], champion[key], max_increase, f"increase <= {max_increase}",
                   candidate[key] - champion[key], ev, pairing.judgement if pairing else None, 0, "reviewed rows")


def _latency(candidate: dict, champion: dict, max_ratio: float, pairing: Pairing | None = None) -> GateResult:
    ev = None
    if pairing is not None and pairing.latency is not None:
        ev = evidence.latency_ratio(*pairing.latency, max_ratio, pairing.judgement)
        cand_p95 = float(np.percentile(np.concatenate(pairing.latency[1]), 95))
        champ_p95 = float(np.percentile(np.concatenate(pairing.latency[0]), 95))
    else:
        cand_p95, champ_p95 = candidate["p95_ms"], champion["p95_ms"]
    return _judged("p95_ratio", cand_p95, champ_p95, max_ratio, f"P95 <= {max_ratio:.3f} x champion",
                   ev.estimate if ev else cand_p95 / champ_p95, ev, pairing.judgement if pairing else None, 0,
                   "timing rounds")


def _mean_drop(gate: str, candidate: dict, champion: dict, limit: float, pairing: Pairing | None) -> GateResult:
    """A per-query mean (NDCG@10, MRR@10) may drop at most `limit` (absolute)."""
    ev = None
    if pairing is not None:
        c, k = pairing.champion[gate], pairing.candidate[gate]
        ones = np.ones_like(c)
        ev = evidence.paired(lambda w: evidence.ratio(c, ones, w) - evidence.ratio(k, ones, w), len(c), limit,
                             "queries", pairing.judgement)
    return _judged(gate, candidate[gate], champion[gate], limit, f"drop <= {limit}", champion[gate] - candidate[gate],
                   ev, pairing.judgement if pairing else None, 0, "queries")


def encoder_gates(candidate: dict, champion: dict, gates: EncoderGates, parity_ok: bool, agreement: float,
                  min_agreement: float, pairing: Pairing | None = None, rare: str = "") -> list[GateResult]:
    """Intent-classifier gates; metrics are fractions, limits in percentage points where the gate says so."""
    out = [_parity(parity_ok, agreement, min_agreement)]
    for key, limit in (("accuracy", gates.max_accuracy_drop_pts),
                       ("rare_class_accuracy", gates.max_rare_class_accuracy_drop_pts),
                       ("escalation_recall", gates.max_escalation_recall_drop_pts)):
        if key in champion and key in candidate:
            out.append(_drop_pts(key, candidate, champion, limit, pairing, rare=rare))
    return [*out, _ece(candidate, champion, gates.max_ece_increase, pairing),
            _latency(candidate, champion, gates.max_p95_ratio, pairing)]


def escalation_gates(candidate: dict, champion: dict, gates: EscalationGates, parity_ok: bool, agreement: float,
                     min_agreement: float, pairing: Pairing | None = None) -> list[GateResult]:
    """Escalation detector: recall of frustrated customers, each model at its own recall-tuned threshold, may drop
    at most `max_recall_drop_pts`; precision may give a little more; calibration and latency as for the classifier."""
    return [_parity(parity_ok, agreement, min_agreement),
            _drop_pts("escalation_recall", candidate, champion, gates.max_recall_drop_pts, pairing, "detector_recall"),
            _drop_pts("escalation_precision", candidate, champion, gates.max_precision_drop_pts, pairing,
                      "detector_precision"),
            _ece(candidate, champion, gates.max_ece_increase, pairing),
            _latency(candidate, champion, gates.max_p95_ratio, pairing)]


def reranker_gates(candidate: dict, champion: dict, gates: RerankerGates, parity_ok: bool, agreement: float,
                   min_agreement: float, pairing: Pairing | None = None) -> list[GateResult]:
    """Reranker: NDCG@10 and MRR@10 each drop at most `max_*_drop` (absolute, per query), P95 at least 30 % better.
    Parity is the rank correlation of relevance scores: near-tied pairs flip their argmax under any noise."""
    return [_parity(parity_ok, agreement, min_agreement, "rank correlation of scores"),
            _mean_drop("ndcg_at_10", candidate, champion, gates.max_ndcg10_drop, pairing),
            _mean_drop("mrr_at_10", candidate, champion, gates.max_mrr10_drop, pairing),
            _latency(candidate, champion, gates.max_p95_ratio, pairing)]


def llm_gates(candidate: dict, base: dict, gates: LlmGates, pairing: Pairing | None = None) -> list[GateResult]:
    """A 4-bit LLM against its unquantized self: perplexity on each held-out text may rise by at most
    `max_perplexity_increase_rel` (relative; paired over text windows), intent-routing accuracy may drop at most the
    given points (paired over routing rows)."""
    out = []
    tol = gates.max_perplexity_increase_rel
    for key in ("perplexity_generic", "perplexity_domain"):
        if key in candidate and key in base:
            ev = None
            if pairing is not None and key in pairing.champion:
                (cn, ct), (kn, kt) = pairing.champion[key], pairing.candidate[key]  # NLL sum, tokens per window
                ev = evidence.paired(lambda w, cn=cn, ct=ct, kn=kn, kt=kt: np.exp(evidence.ratio(kn, kt, w)
                                                                                  - evidence.ratio(cn, ct, w)) - 1,
                                     len(cn), tol, "text windows", pairing.judgement)
            out.append(_judged(key, candidate[key], base[key], tol, f"relative increase <= {tol:.3f}",
                               candidate[key] / base[key] - 1, ev, pairing.judgement if pairing else None, 0,
                               "text windows"))
    route = pairing if pairing is not None and "routing_accuracy" in pairing.champion else None
    if route is not None:
        route = Pairing(pairing.candidate["routing_accuracy"], pairing.champion["routing_accuracy"], pairing.judgement)
    out.append(_drop_pts("routing_accuracy", candidate, base, gates.max_routing_accuracy_drop_pts, route))
    if gates.max_average_bits is not None and "average_bits" in candidate:  # read off the checkpoint: no statistics
        out.append(_result("average_bits", candidate["average_bits"] <= gates.max_average_bits,
                           candidate["average_bits"], base.get("average_bits", 32.0),
                           f"<= {gates.max_average_bits:g} stored bits per decoder-layer weight"))
    return out


def shadow_gates(shadow: dict, champion: dict, cfg: ShadowConfig, quality: EncoderGates,
                 pairing: Pairing | None = None, rare: str = "") -> list[GateResult]:
    """A shadow against the champion on the same mirrored requests: agreement, reliability and P95 always; the
    quality gates of the offline decision on the reviewed labels that arrived (`shadow` holds what was measured),
    paired over the reviewed requests both answered when `pairing` holds their answers."""
    out = [_result("agreement", shadow["agreement"] >= cfg.min_agreement, shadow["agreement"], 1.0,
                   f">= {cfg.min_agreement:.3f} of answers equal to the champion's"),
           _result("shadow_error_rate", shadow["error_rate"] <= cfg.max_shadow_error_rate + 1e-12,
                   shadow["error_rate"], 0.0, f"<= {cfg.max_shadow_error_rate:.3f} of mirrored requests unanswered"),
           _latency(shadow, champion, cfg.max_p95_ratio)]
    if "accuracy" in shadow:
        for key, limit in (("accuracy", quality.max_accuracy_drop_pts),
                           ("rare_class_accuracy", quality.max_rare_class_accuracy_drop_pts),
                           ("escalation_recall", quality.max_escalation_recall_drop_pts)):
            if all(key in m and m[key] == m[key] for m in (shadow, champion)):  # NaN: no reviewed rows of it
                out.append(_drop_pts(key, shadow, champion, limit, pairing, rare=rare))
        if all("macro_f1" in m for m in (shadow, champion)):
            out.append(_macro_f1(shadow, champion, quality.max_accuracy_drop_pts, pairing))
        out.append(_ece(shadow, champion, quality.max_ece_increase, pairing, key="ece"))
    return out


def overlap_gate(shadow: dict, min_overlap: float) -> GateResult:
    """A reranker shadow keeps at least `min_overlap` of the champion's top k passages in its own top k."""
    return _result("overlap_at_k", shadow["overlap_at_k"] >= min_overlap, shadow["overlap_at_k"], 1.0,
                   f">= {min_overlap:.3f} of the champion's top k passages in the shadow's top k")


def weighted_macro_f1(o: dict, classes: int, w: np.ndarray) -> np.ndarray:
    """Macro-F1 over the classes present among the units as they are, under unit weights w."""
    y, pred = o["y"], o["pred"]
    f1s = []
    for c in range(classes):
        support = (y == c).astype(float)
        if not support.any():
            continue
        tp = w @ (support * (pred == c))
        denom = w @ support + w @ (pred == c).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1s.append(np.where(denom > 0, 2 * tp / denom, 0.0))
    return np.mean(f1s, axis=0)


def _macro_f1(shadow: dict, champion: dict, limit_pts: float, pairing: Pairing | None) -> GateResult:
    ev = None
    if pairing is not None:
        c, k = pairing.champion, pairing.candidate
        classes = int(max(c["y"].max(initial=0), c["pred"].max(initial=0), k["pred"].max(initial=0)) + 1)
        ev = evidence.paired(lambda w: 100 * (weighted_macro_f1(c, classes, w) - weighted_macro_f1(k, classes, w)),
                             len(c["y"]), limit_pts, "reviewed rows", pairing.judgement)
    return _judged("macro_f1", shadow["macro_f1"], champion["macro_f1"], limit_pts, f"drop <= {limit_pts} pts",
                   100 * (champion["macro_f1"] - shadow["macro_f1"]), ev, pairing.judgement if pairing else None, 0,
                   "reviewed rows")


def undecided(results: list[GateResult]) -> list[GateResult]:
    """The gates the data could not resolve (whatever the configured fallback then did)."""
    return [r for r in results if r.insufficient]


def table(candidate: str, results: list[GateResult]) -> list[dict]:
    """One row per gate: estimate, interval, tolerance, verdict, what decided it (the decision run's gate table)."""
    def num(x):
        return None if x is None or x != x else float(x)  # NaN (a check has no loss): None, so JSON round-trips

    return [{"candidate": candidate, "gate": r.gate, "candidate_value": num(r.candidate),
             "champion_value": num(r.champion), "loss": num(r.loss), "ci_low": num(r.low), "ci_high": num(r.high),
             "tolerance": num(r.tolerance), "verdict": r.verdict,
             "decided_by": r.decided_by, "passed": r.passed, "units": r.units, "unit": r.unit,
             "more_units_needed": r.more_units} for r in results]


def summarize(results: list[GateResult]) -> str:
    failed = [r for r in results if not r.passed]
    if not failed:
        return "all gates passed"
    return "; ".join(f"{r.gate} failed ({r.limit}): {r.failure_mode} -> {r.fix}" for r in failed)
