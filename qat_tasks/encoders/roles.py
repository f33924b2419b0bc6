"""What each encoder is for, as the INT8 track needs it: its labels, the metrics beyond the shared
classification report, its promotion gates, what the candidate-selection rule reads as its tolerance, and a headline.

  intent_classifier    ten intents; rare-class accuracy and escalation recall matter most
  escalation_detector  calm / frustrated; a threshold tuned for recall on held-out rows decides
  reranker             a cross-encoder scoring (query, passage) pairs; judged by NDCG@10 and MRR@10
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.metrics import fit_temperature, ranking_metrics, recall_threshold, threshold_report
from qat_tasks.core.schema import INTENTS
from qat_tasks.data.role_splits import ESCALATION_LABELS, RERANK_LABELS
from qat_tasks.promotion import gates

ENCODER_ROLES = ("intent_classifier", "escalation_detector", "reranker")


class IntentRole:
    name = "intent_classifier"
    pair = False
    sensitivity_keys = ("accuracy", "rare_class_accuracy")
    labelled_sources: tuple[str, ...] = ("reviewed",)  # label sources the candidate-selection rule counts

    def __init__(self, cfg: PipelineConfig, model_name: str):
        self.cfg, self.mcfg = cfg, cfg.model(model_name)
        self.labels = list(INTENTS)
        self.rare = list(cfg.calibration.rare_intents)

    @property
    def gate_config(self):
        return getattr(self.cfg.gates, self.name)  # gates.<role>

    def tolerance_pts(self) -> float:
        return self.gate_config.max_accuracy_drop_pts

    def labelled_fraction(self, rows: list[dict]) -> float:
        return sum(r["label_source"] in self.labelled_sources for r in rows) / max(1, len(rows))

    def extra_metrics(self, probs: np.ndarray, y: np.ndarray, rows: list[dict], tune_probs: np.ndarray,
                      tune_y: np.ndarray) -> dict:
        return {}

    def serving_meta(self, tune_probs: Callable[[], np.ndarray], tune_y: np.ndarray) -> dict:
        """What the served package needs beyond its labels, from held-out probabilities (computed on demand): the
        temperature that calibrates its confidences, fitted as the evaluation fits it (so the confidences the
        service logs are the ones the offline `ece_after_ts` gate judged)."""
        return {"temperature": fit_temperature(np.log(np.clip(tune_probs(), 1e-12, None)), tune_y)}

    def packaged_settings(self, metrics: dict) -> dict:
        """The same settings for an evaluated candidate, from its evaluation report."""
        return {"temperature": metrics["temperature"]}

    def gates(self, cand: dict, champ: dict, parity_ok: bool, agreement: float, min_agreement: float,
              pairing: gates.Pairing | None = None):
        return gates.encoder_gates(cand, champ, self.gate_config, parity_ok, agreement, min_agreement, pairing,
                                   ", ".join(self.rare))

    def outcomes(self, report: dict) -> dict:
        """Per-row figures of an evaluation report, what the paired gates resample: labels, answers,
        temperature-scaled confidences, rare-class and escalation rows."""
        y, pred = report["y_true"], report["probs"].argmax(1)
        out = {"y": y, "pred": pred, "conf_t": report["conf_t"], "ece_bins": self.cfg.evaluation.ece_bins,
               "rare_mask": np.isin(y, [self.labels.index(r) for r in self.rare if r in self.labels])}
        if "escalation" in self.labels:
            out["escalation_mask"] = y == self.labels.index("escalation")
        return out

    def parity(self, candidate_logits: np.ndarray, reference_logits: np.ndarray) -> float:
        """How closely a graph reproduces the PyTorch model it came from: top-1 agreement."""
        return float((candidate_logits.argmax(1) == reference_logits.argmax(1)).mean())

    def rank_key(self, m: dict) -> tuple:
        """Which of several passing candidates is best: the most accurate, ties to the faster."""
        return m["accuracy"], m.get("rare_class_accuracy", 0.0), -m["p95_ms"]

    def headline(self, m: dict) -> str:
        return (f"accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, rare-class accuracy "
                f"{m.get('rare_class_accuracy', float('nan')):.3f}, escalation recall "
                f"{m.get('escalation_recall', float('nan')):.3f}, ECE {m['ece']:.3f}")


class EscalationRole(IntentRole):
    name = "escalation_detector"
    sensitivity_keys = ("escalation_recall", "accuracy")
    labelled_sources = ("reviewed", "human_rated")

    def __init__(self, cfg: PipelineConfig, model_name: str):
        super().__init__(cfg, model_name)
        self.labels, self.rare = list(ESCALATION_LABELS), ["frustrated"]

    def tolerance_pts(self) -> float:
        return self.gate_config.max_recall_drop_pts

    def threshold(self, tune_probs: np.ndarray, tune_y: np.ndarray) -> float:
        """The decision threshold tuned on held-out rows for the configured frustrated-customer recall."""
        pos = self.labels.index("frustrated")
        return recall_threshold(tune_probs[:, pos], tune_y == pos, self.mcfg.data.target_recall)

    def serving_meta(self, tune_probs, tune_y) -> dict:
        """The recall-tuned threshold; no temperature: the threshold is tuned on the raw probabilities."""
        return {"threshold": self.threshold(tune_probs(), tune_y)}

    def packaged_settings(self, metrics: dict) -> dict:
        return {"threshold": metrics["threshold"]}  # the INT8 model's own recall-tuned threshold

    def extra_metrics(self, probs, y, rows, tune_probs, tune_y) -> dict:
        """Recall, precision and alarm rate at the threshold tuned on held-out rows for the target recall."""
        threshold = self.threshold(tune_probs, tune_y)
        at = threshold_report(probs[:, self.labels.index("frustrated")], y == self.labels.index("frustrated"),
                              threshold)
        return {"threshold": threshold, "escalation_recall": at["recall"], "escalation_precision": at["precision"],
                "escalation_f1": at["f1"], "alarm_rate": at["alarm_rate"]}

    def gates(self, cand, champ, parity_ok, agreement, min_agreement, pairing=None):
        return gates.escalation_gates(cand, champ, self.gate_config, parity_ok, agreement, min_agreement, pairing)

    def outcomes(self, report: dict) -> dict:
        """Also each row's alarm at the model's own recall-tuned threshold."""
        pos = self.labels.index("frustrated")
        out = super().outcomes(report)
        out.update({"alarm": report["probs"][:, pos] >= report["threshold"], "positive": report["y_true"] == pos})
        return out

    def rank_key(self, m: dict) -> tuple:
        return m["escalation_recall"], m["escalation_precision"], -m["p95_ms"]

    def headline(self, m: dict) -> str:
        return (f"escalation recall {m['escalation_recall']:.3f} at threshold {m['threshold']:.3f} (precision "
                f"{m['escalation_precision']:.3f}), accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
                f"ECE {m['ece']:.3f}")


class RerankerRole(IntentRole):
    name = "reranker"
    pair = True
    sensitivity_keys = ("ndcg_at_10", "mrr_at_10")

    def __init__(self, cfg: PipelineConfig, model_name: str):
        super().__init__(cfg, model_name)
        self.labels, self.rare = list(RERANK_LABELS), []

    def tolerance_pts(self) -> float:
        return 100 * min(self.gate_config.max_ndcg10_drop, self.gate_config.max_mrr10_drop)

    def labelled_fraction(self, rows: list[dict]) -> float:
        return 1.0  # the relevant passage is known by construction

    def serving_meta(self, tune_probs, tune_y) -> dict:
        return {}  # a ranking: only the order of scores matters

    def packaged_settings(self, metrics: dict) -> dict:
        return {}

    def extra_metrics(self, probs, y, rows, tune_probs, tune_y) -> dict:
        # Relevance score = log-odds of "relevant": the ranking a softmax head implies, without saturation.
        rel = self.labels.index("relevant")
        p = np.clip(probs, 1e-12, 1.0)
        scores = np.log(p[:, rel]) - np.log(p[:, 1 - rel])
        return ranking_metrics(scores, [r["group"] for r in rows], y == rel, k=10)

    def gates(self, cand, champ, parity_ok, agreement, min_agreement, pairing=None):
        return gates.reranker_gates(cand, champ, self.gate_config, parity_ok, agreement, min_agreement, pairing)

    def outcomes(self, report: dict) -> dict:
        """Per query: NDCG@10 and MRR@10 (the units the ranking gates resample)."""
        return {**super().outcomes(report), **report["per_group"]}

    def parity(self, candidate_logits: np.ndarray, reference_logits: np.ndarray) -> float:
        """Spearman correlation of relevance scores: ranking is what the reranker is for, and a weakly separated
        pair flips its argmax under quantization noise while an operator mismatch scrambles the order."""
        def ranks(logits):
            return np.argsort(np.argsort(logits[:, 1] - logits[:, 0])).astype(float)

        a, b = ranks(candidate_logits), ranks(reference_logits)
        return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0

    def rank_key(self, m: dict) -> tuple:
        return m["ndcg_at_10"], m["mrr_at_10"], -m["p95_ms"]

    def headline(self, m: dict) -> str:
        return (f"NDCG@10 {m['ndcg_at_10']:.3f}, MRR@10 {m['mrr_at_10']:.3f}, hit@1 {m['hit_at_1']:.3f} over "
                f"{int(m['groups'])} queries, pair accuracy {m['accuracy']:.3f}")


ROLES = {r.name: r for r in (IntentRole, EscalationRole, RerankerRole)}


def role_for(cfg: PipelineConfig, model_name: str) -> IntentRole:
    role = cfg.model(model_name).role
    if role not in ROLES:
        raise ValueError(f"model {model_name}: role {role!r} has no INT8 encoder track")
    return ROLES[role](cfg, model_name)
