"""What a shadow review measures on the escalation detector's and the reranker's mirrored requests (the intent
classifier's measurement, with the quality gates on reviewed labels, is `shadow.measure`).

  escalation detector  agreement on the escalate decision; per decision of the champion, how often the shadow
                       decided otherwise (a frustrated customer the shadow would not escalate is the costly case);
                       the probabilities' mean absolute difference
  reranker             top-1 agreement (the same passage first) and overlap@k: the share of the champion's top k
                       passages that the shadow's top k also holds, averaged over requests

Both: the shadow's unanswered mirrors and the latency of both models on the same requests. Review labels are
intents, so these roles' reviews judge agreement, reliability and latency; their quality was judged offline on
labelled rows before the version could go into shadow.
"""

from __future__ import annotations

import numpy as np

ESCALATION_DECISIONS = ["calm", "frustrated"]  # the decision as a label: escalate False / True


def _latency(pairs) -> tuple[dict, dict, dict]:
    c_lat = np.array([c.latency_ms for c, _ in pairs])
    s_lat = np.array([s.latency_ms for _, s in pairs])
    n = len(pairs)

    def p(a, q):
        return float(np.percentile(a, q)) if n else float("nan")

    return ({"p50_ms": p(s_lat, 50), "p95_ms": p(s_lat, 95)}, {"p50_ms": p(c_lat, 50), "p95_ms": p(c_lat, 95)},
            {"champion": c_lat.tolist(), "shadow": s_lat.tolist()})


def measure(role: str, champ: dict, pairs: list) -> tuple[dict, dict, dict]:
    """(shadow metrics, champion metrics, details) on the mirrored requests of an escalation detector or reranker."""
    from qat_tasks.core.metrics import confusion

    n = len(pairs)
    s_lat, c_lat, latency = _latency(pairs)
    shadow = {"mirrored": len(champ), "answered": n, "error_rate": 1 - n / len(champ) if champ else 1.0,
              "reviewed": 0, **s_lat}
    champion = {"reviewed": 0, **c_lat}
    details: dict = {"per_class": {}, "latency_ms": latency}
    if role == "escalation_detector":
        c_dec = np.array([int(c.escalate) for c, _ in pairs], dtype=int)
        s_dec = np.array([int(s.escalate) for _, s in pairs], dtype=int)
        shadow["agreement"] = float((c_dec == s_dec).mean()) if n else 0.0
        shadow["p_frustrated_mean_abs_diff"] = (float(np.mean([abs(c.p_frustrated - s.p_frustrated) for c, s in pairs]))
                                                if n else float("nan"))
        shadow["escalation_rate"] = float(s_dec.mean()) if n else float("nan")
        champion["escalation_rate"] = float(c_dec.mean()) if n else float("nan")
        for i, decision in enumerate(ESCALATION_DECISIONS):
            mask = c_dec == i
            if mask.any():
                details["per_class"][decision] = {"champion_answers": int(mask.sum()),
                                                  "shadow_disagrees": int((s_dec[mask] != i).sum()),
                                                  "disagreement": float((s_dec[mask] != i).mean())}
        details["agreement_matrix"] = confusion(c_dec, s_dec, 2)
        details["labels"] = ESCALATION_DECISIONS
    else:
        top1 = [c.ranking[:1] == s.ranking[:1] for c, s in pairs]
        overlap = [len(set(c.ranking) & set(s.ranking)) / max(1, len(c.ranking)) for c, s in pairs]
        shadow["agreement"] = float(np.mean(top1)) if n else 0.0
        shadow["overlap_at_k"] = float(np.mean(overlap)) if n else 0.0
        details["overlap_at_k"] = overlap
    return shadow, champion, details
