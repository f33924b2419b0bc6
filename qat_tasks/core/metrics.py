"""Business metrics for classifiers: accuracy, rare-class accuracy, macro-F1, per-class precision and recall,
escalation recall and expected calibration error."""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default): honest at small n and near 0 or 1, where the
    normal approximation is not. (0, 1) when there is nothing to count."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def classification_report(y_true: np.ndarray, probs: np.ndarray, labels: list[str], rare: list[str],
                          ece_bins: int = 15) -> dict:
    """Metrics on a labelled set; accuracies and recalls as fractions in [0, 1]."""
    return prediction_report(y_true, probs.argmax(axis=1), probs.max(axis=1), labels, rare, ece_bins)


def prediction_report(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, labels: list[str],
                      rare: list[str], ece_bins: int = 15) -> dict:
    """classification_report from top-1 answers alone (what a served model logs: intent and confidence)."""
    correct = (y_pred == y_true).astype(float)
    cm = confusion(y_true, y_pred, len(labels))
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    rare_idx = [labels.index(r) for r in rare if r in labels]
    rare_mask = np.isin(y_true, rare_idx)
    report = {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "rare_class_accuracy": float(correct[rare_mask].mean()) if rare_mask.any() else float("nan"),
        "ece": expected_calibration_error(confidence, correct, ece_bins),
        "n": int(len(y_true)),
        "per_class": {lbl: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                            "support": int(support[i])} for i, lbl in enumerate(labels)},
        "confusion": cm,
    }
    if "escalation" in labels:
        report["escalation_recall"] = float(recall[labels.index("escalation")])
    return report


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of held-out labels (golden-section search on log T)."""
    def nll(log_t: float) -> float:
        z = logits / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(a) < nll(b):
            hi, b = b, a
            a = hi - g * (hi - lo)
        else:
            lo, a = a, b
            b = lo + g * (hi - lo)
    return float(np.exp((lo + hi) / 2))


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def recall_threshold(p_positive: np.ndarray, y_positive: np.ndarray, target_recall: float) -> float:
    """The highest decision threshold whose recall of the positive class on held-out rows reaches
    `target_recall`: a missed frustrated customer costs more than a false alarm."""
    pos = np.sort(p_positive[y_positive.astype(bool)])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive rows to tune the threshold on")
    k = max(1, int(np.ceil(target_recall * len(pos))))  # catch at least k of the positives
    return float(pos[k - 1])


def threshold_report(p_positive: np.ndarray, y_positive: np.ndarray, threshold: float) -> dict:
    pred = p_positive >= threshold
    y = y_positive.astype(bool)
    tp = float((pred & y).sum())
    recall = tp / max(1, y.sum())
    precision = tp / pred.sum() if pred.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"recall": recall, "precision": precision, "f1": f1, "alarm_rate": float(pred.mean())}


def ranking_metrics(scores: np.ndarray, groups: list[str], relevant: np.ndarray, k: int = 10) -> dict:
    """NDCG@k and MRR@k over query groups with one relevant candidate each. Ties rank the relevant candidate
    last among equals (a pessimistic rank), so a model that scores everything alike earns nothing."""
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    ndcg, mrr, ranks = [], [], []
    for idx in by_group.values():
        idx_arr = np.array(idx)
        rel = relevant[idx_arr].astype(bool)
        if rel.sum() != 1:
            raise ValueError(f"ranking group with {int(rel.sum())} relevant candidates; expected exactly one")
        s = scores[idx_arr]
        pos = s[rel][0]
        rank = int((s[~rel] >= pos).sum()) + 1
        ranks.append(rank)
        ndcg.append(1.0 / np.log2(rank + 1) if rank <= k else 0.0)
        mrr.append(1.0 / rank if rank <= k else 0.0)
    return {f"ndcg_at_{k}": float(np.mean(ndcg)), f"mrr_at_{k}": float(np.mean(mrr)),
            "hit_at_1": float(np.mean(np.array(ranks) == 1)), "groups": len(by_group),
            "per_group": {f"ndcg_at_{k}": np.array(ndcg), f"mrr_at_{k}": np.array(mrr)}}
