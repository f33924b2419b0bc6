"""How much the promotion gates can tell: the paired non-inferiority test against the point rule, side by side.

    .venv/bin/python bench/gate_power.py                  # after scripts/demo.sh: reads its MLflow store
    .venv/bin/python bench/gate_power.py --trials 1000 --store sqlite:///path/to/mlflow.db

Reads the per-row outcomes every INT8 decision logs (`evidence/evidence.npz` of the `int8-decision` runs: the
champion's and the finalist's answers on the evaluation rows, and their interleaved latency rounds), then, for
the demo's size and tolerances (configs/demo.yaml) and production's (configs/production.yaml), simulates many
candidates by resampling those real outcomes with a known loss injected:

  a rate gate (accuracy, rare-class accuracy, escalation recall): rows resampled with replacement; candidate
      answers flipped at random (right -> wrong where both were right, or wrong -> right where only the
      champion was right) until the candidate's expected loss is the injected one
  a per-query gate (NDCG@10): queries resampled; the candidate's per-query differences shifted to the loss
  the P95 ratio: timing rounds resampled (at production's round size, requests drawn from all rounds, each
      keeping both models' times on it); the candidate's times scaled to the injected ratio

and judges each simulated candidate with the gate's own test (the paired bootstrap interval at
gates.confidence against the tolerance: pass / fail / insufficient evidence) and with the point rule (the
estimate against the tolerance). Printed per gate and size:

  detects      the smallest injected loss (of a grid of multiples of the tolerance) the gate fails in at least
               80 % of trials
  false pass   how often a candidate that truly loses 1.2 x its tolerance passes (target: at most 5 %)
  blocks good  how often a candidate that loses nothing is not passed (for the test: failed or insufficient)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GRID = (1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
BAD, GOOD_LATENCY, BAD_LATENCY = 1.2, 0.8, 1.1


def load_evidence(store: str) -> dict[str, dict[str, np.ndarray]]:
    """model name -> the newest INT8 decision's evidence arrays."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store)
    out = {}
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'int8-decision'", order_by=["start_time DESC"])
        for run in runs:
            names = [a.path for a in client.list_artifacts(run.info.run_id, "evidence")]
            if "evidence/evidence.npz" in names:
                with tempfile.TemporaryDirectory() as tmp:
                    path = client.download_artifacts(run.info.run_id, "evidence/evidence.npz", tmp)
                    out[exp.name.split("-", 1)[1]] = dict(np.load(path))
                break
    return out


def verdicts(c: np.ndarray, k: np.ndarray, w: np.ndarray, tolerance: float, scale: float, level: float):
    """Paired test and point rule for many trials at once: c, k are (units, trials) per-unit scores of champion
    and candidate; loss = scale * (mean c - mean k). Returns (test verdicts, point passes) per trial."""
    from qat_tasks.promotion import evidence

    n = c.shape[0]
    est = scale * (c.mean(0) - k.mean(0))
    draws = scale * (w @ (c - k)) / n  # (resamples, trials)
    alpha = (1 - level) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha], axis=0)
    test = np.array([evidence.verdict_of(e, lo, hi, tolerance) for e, lo, hi in zip(est, low, high, strict=True)])
    return test, est <= tolerance + 1e-9


def rate_trials(c_right: np.ndarray, k_right: np.ndarray, n: int, loss_pts: float, trials: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resampled rows with the candidate's expected loss set to `loss_pts` by random flips."""
    idx = rng.integers(0, len(c_right), size=(n, trials))
    c, k = c_right[idx].astype(float), k_right[idx].astype(float)
    real = 100 * (c_right.mean() - k_right.mean())
    both = (c_right & k_right).mean()
    only_champ = (c_right & ~k_right).mean()
    u = rng.random((n, trials))
    if loss_pts >= real:
        q = min(1.0, (loss_pts - real) / 100 / max(both, 1e-12))
        k = np.where((c == 1) & (k == 1) & (u < q), 0.0, k)
    else:
        q = min(1.0, (real - loss_pts) / 100 / max(only_champ, 1e-12))
        k = np.where((c == 1) & (k == 0) & (u < q), 1.0, k)
    return c, k


def shift_trials(c_val: np.ndarray, k_val: np.ndarray, n: int, loss: float, trials: int, rng):
    idx = rng.integers(0, len(c_val), size=(n, trials))
    d = c_val - k_val
    return c_val[idx], (c_val - (d - d.mean() + loss))[idx]


def latency_trials(champ: np.ndarray, cand: np.ndarray, per_round: int, ratio: float, trials: int, level: float,
                   resamples: int, max_ratio: float, rng):
    """(test verdicts, point passes) of the P95-ratio gate over simulated interleaved timings."""
    from qat_tasks.promotion import evidence

    r = champ.shape[0]
    real = np.percentile(cand, 95) / np.percentile(champ, 95)
    test, point = [], []
    j = evidence.Judgement(level, resamples, 0)
    pooled_c, pooled_k = champ.ravel(), cand.ravel()
    for _ in range(trials):
        if per_round == champ.shape[1]:  # the decision's own size: whole rounds resampled
            rounds = rng.integers(0, r, r)
            c, k = champ[rounds], cand[rounds] * (ratio / real)
        else:  # another round size: requests drawn from all rounds, each with both models' times on it
            idx = rng.integers(0, len(pooled_c), (r, per_round))
            c, k = pooled_c[idx], pooled_k[idx] * (ratio / real)
        ev = evidence.latency_ratio(list(c), list(k), max_ratio, evidence.Judgement(j.level, j.resamples,
                                                                                    int(rng.integers(1 << 30))))
        test.append(ev.verdict)
        point.append(ev.estimate <= max_ratio)
    return np.array(test), np.array(point)


def smallest_detected(judge, multiples, tolerance: float) -> tuple[float | None, float | None]:
    """The smallest multiple of the tolerance failed in >= 80 % of trials, by the test and by the point rule."""
    from qat_tasks.promotion import evidence

    test = point = None
    for m in multiples:
        t, p = judge(m * tolerance)
        if test is None and (t == evidence.FAIL).mean() >= 0.8:
            test = m * tolerance
        if point is None and (~p).mean() >= 0.8:
            point = m * tolerance
        if test is not None and point is not None:
            break
    return test, point


def main() -> int:
    from qat_tasks.core.config import load_config
    from qat_tasks.promotion import evidence

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=f"sqlite:///{ROOT}/.state/mlflow/mlflow.db")
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples per trial (gates: 2000)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    found = load_evidence(args.store)
    if not found:
        print(f"no INT8 decision evidence in {args.store}: run scripts/demo.sh first", file=sys.stderr)
        return 2
    demo, prod = (load_config(ROOT / "configs" / f"{p}.yaml") for p in ("demo", "production"))
    rng = np.random.default_rng(args.seed)
    rows = []
    for model, ev in sorted(found.items()):
        role = demo.model(model).role
        gates = []
        if role == "intent_classifier":
            y, cp, kp = ev["candidate.y"], ev["champion.pred"], ev["candidate.pred"]
            c_right, k_right = cp == y, kp == y
            rare = ev["champion.rare_mask"].astype(bool)
            gates.append(("accuracy", "rows", c_right, k_right, 1.0,
                          lambda g: g.intent_classifier.max_accuracy_drop_pts))
            gates.append(("rare_class_accuracy", "rare rows", c_right[rare], k_right[rare], rare.mean(),
                          lambda g: g.intent_classifier.max_rare_class_accuracy_drop_pts))
        elif role == "escalation_detector":
            pos = ev["champion.positive"].astype(bool)
            gates.append(("escalation_recall", "frustrated rows", ev["champion.alarm"][pos].astype(bool),
                          ev["candidate.alarm"][pos].astype(bool), pos.mean(),
                          lambda g: g.escalation_detector.max_recall_drop_pts))
        elif role == "reranker":
            gates.append(("ndcg_at_10", "queries", ev["champion.ndcg_at_10"], ev["candidate.ndcg_at_10"], None,
                          lambda g: g.reranker.max_ndcg10_drop))
        n_demo = len(ev["candidate.y"])
        for profile, cfg in (("demo", demo), ("production", prod)):
            level = cfg.gates.confidence
            eval_rows = cfg.calibration.sizes.evaluation if role == "intent_classifier" else None
            for gate, unit, c_val, k_val, share, tol_of in gates:
                tol = tol_of(cfg.gates)
                if share is None:  # per query: the reranker's evaluation groups
                    n = len(c_val) if profile == "demo" else (cfg.model(model).data.max_rows.evaluation or len(c_val))
                    scale, make = 1.0, shift_trials
                else:
                    total = n_demo if profile == "demo" else (eval_rows or cfg.model(model).data.max_rows.evaluation
                                                              or n_demo)
                    n = max(1, round(total * share))
                    scale, make = 100.0, rate_trials
                w = evidence.resample_weights(n, args.resamples, int(rng.integers(1 << 30)))

                def judge(loss, gate=gate, c_val=c_val, k_val=k_val, n=n, make=make, tol=tol, scale=scale,
                          level=level, w=w):
                    c, k = make(c_val, k_val, n, loss, args.trials, rng)
                    return verdicts(c, k, w, tol, scale, level)

                detect_test, detect_point = smallest_detected(judge, GRID, tol)
                t_bad, p_bad = judge(BAD * tol)
                t_good, p_good = judge(0.0)
                rows.append((model, gate, profile, f"{n} {unit}", tol, detect_test, detect_point,
                             (t_bad == evidence.PASS).mean(), p_bad.mean(), (t_good != evidence.PASS).mean(),
                             (t_good == evidence.INSUFFICIENT).mean(), (~p_good).mean()))
            # Latency: interleaved rounds of the decision, resampled to the profile's rounds.
            ev_c, ev_k = ev["latency.champion"], ev["latency.candidate"]
            per_round = max(1, cfg.evaluation.latency_samples // cfg.evaluation.latency_rounds)
            max_ratio = getattr(cfg.gates, role).max_p95_ratio
            trials = max(50, args.trials // 4)  # each latency trial bootstraps percentiles: slower
            timed = partial(latency_trials, ev_c, ev_k, per_round, trials=trials, level=level,
                            resamples=args.resamples, max_ratio=max_ratio, rng=rng)
            detect_test, detect_point = smallest_detected(timed, (1.05, 1.1, 1.2, 1.35, 1.5), max_ratio)
            t_bad, p_bad = latency_trials(ev_c, ev_k, per_round, BAD_LATENCY * max_ratio, trials, level,
                                          args.resamples, max_ratio, rng)
            t_good, p_good = latency_trials(ev_c, ev_k, per_round, GOOD_LATENCY * max_ratio, trials, level,
                                            args.resamples, max_ratio, rng)
            rows.append((model, "p95_ratio", profile, f"{cfg.evaluation.latency_rounds} rounds x {per_round}",
                         max_ratio, detect_test, detect_point, (t_bad == evidence.PASS).mean(), p_bad.mean(),
                         (t_good != evidence.PASS).mean(), (t_good == evidence.INSUFFICIENT).mean(),
                         (~p_good).mean()))

    def f(x, pct=False):
        return "  > grid" if x is None else (f"{100 * x:6.1f} %" if pct else f"{x:8.3f}")

    print(f"gate power: {args.trials} simulated candidates per cell (latency: {max(50, args.trials // 4)}), "
          f"{args.resamples} bootstrap resamples each; false pass at {BAD} x tolerance (latency: {BAD_LATENCY} x the "
          f"maximum ratio), 'good' loses nothing (latency: {GOOD_LATENCY} x the maximum ratio)")
    head = (f"{'model':<20} {'gate':<20} {'size':<11} {'units':<22} {'tolerance':>9} | {'detects':>8} {'point':>8} "
            f"| {'false pass':>10} {'point':>8} | {'blocks good':>11} {'(unres.)':>9} {'point':>8}")
    print(head)
    print("-" * len(head))
    for (model, gate, profile, units, tol, dt, dp, fb, pb, tg, ug, pg) in rows:
        print(f"{model:<20} {gate:<20} {profile:<11} {units:<22} {tol:>9.3f} | {f(dt)} {f(dp)} | {f(fb, True):>10} "
              f"{f(pb, True)} | {f(tg, True):>11} {f(ug, True):>9} {f(pg, True)}")
    print("\ndetects: smallest injected loss failed in >= 80 % of trials (test = paired interval, point = estimate); "
          "false pass: share passed though it loses more than the tolerance; blocks good: share not passed though "
          "it loses nothing ((unres.): of which insufficient evidence).")
    missing = {"intent-classifier", "escalation-detector", "reranker"} - set(found)
    if missing:
        print(f"no decision evidence for {sorted(missing)}: no finalist reached the evaluation split in that run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
