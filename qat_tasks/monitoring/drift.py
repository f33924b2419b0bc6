"""The drift monitor: is recent traffic still the traffic the quantized models were calibrated on?

Statistics per request (`statistics`), the calibration-time reference (`reference`) and the distances
(`distances`) live beside this module; here: the comparison, the daily run and the recalibration trigger.

A model has drifted when any selected feature reaches `drift.psi_threshold`
(PSI) or `drift.ks_threshold` (KS). With the demo's MiniLM champions, five undrifted generated days (300
requests each) peaked at PSI 0.15 and KS 0.11 over all ~45 features, a catalogue-launch day at PSI 0.58 and
KS 0.32 (activations alone: 0.55): the defaults 0.25 and 0.2 sit between. Reported beside it, per layer:
range overflow, the share of live requests whose max |a| passes the largest of the reference, i.e. what a
min-max calibrated INT8 model would clip.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import Counter
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np

from qat_tasks.core import params as params_
from qat_tasks.core import tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.config_operations import DriftConfig
from qat_tasks.core.schema import SERVED_ROLES
from qat_tasks.data.labels import read_labels
from qat_tasks.monitoring import statistics
from qat_tasks.monitoring.distances import ks, psi, psi_categorical
from qat_tasks.monitoring.reference import _download, _reference_for, sample_traffic
from qat_tasks.monitoring.statistics import DriftError

log = logging.getLogger(__name__)

GROUP_WORD = {"activations": "activation", "inputs": "input", "predictions": "prediction"}


# -- comparison --------------------------------------------------------------------------------------------
def compare(reference: dict, live: dict, dcfg: DriftConfig) -> dict:
    """Distances of each selected feature, range overflow per layer, and the verdict."""
    rows, overflow, hits = [], {}, []
    for name, ref in reference["features"].items():
        if ref["group"] not in dcfg.features or name not in live["features"]:
            continue
        r, v = ref["values"], live["features"][name]["values"]
        row = {"feature": name, "group": ref["group"], "kind": ref["kind"]}
        if ref["kind"] == "continuous":
            row.update(psi=psi(r, v, dcfg.bins), ks=ks(r, v), reference=float(np.median(r)), live=float(np.median(v)))
        else:
            row.update(psi=psi_categorical(r, v), ks=None, **_top_shift(r, v))
            if set(r) | set(v) <= {"yes", "no"}:  # binary: KS is the difference of the shares
                row["ks"] = abs(row["live_share"] - row["reference_share"])
        rows.append(row)
        for metric, threshold in (("psi", dcfg.psi_threshold), ("ks", dcfg.ks_threshold)):
            if row[metric] is not None and row[metric] >= threshold:
                hits.append({"feature": name, "group": ref["group"], "metric": metric, "value": row[metric],
                             "threshold": threshold})
        if name.endswith(".absmax"):
            overflow[name.removesuffix(".absmax")] = float(np.mean(np.asarray(v) > max(r)))
    hits.sort(key=lambda h: h["value"] / h["threshold"], reverse=True)
    rows.sort(key=lambda r: r["psi"], reverse=True)
    return {"features": rows, "overflow": overflow, "hits": hits, "drifted": bool(hits),
            "drift_score": max((r["psi"] for r in rows), default=0.0)}


def _top_shift(ref: list[str], cur: list[str]) -> dict:
    """The category whose share moved most (for the report: 'checkout_help 0.03 -> 0.12')."""
    a, b = Counter(ref), Counter(cur)
    cat = "yes" if set(a) | set(b) <= {"yes", "no"} else max(
        set(a) | set(b), key=lambda c: abs(b[c] / max(1, len(cur)) - a[c] / max(1, len(ref))))
    return {"category": cat, "reference_share": a[cat] / max(1, len(ref)), "live_share": b[cat] / max(1, len(cur))}


def _explain(hits: list[dict], n: int = 2) -> str:
    groups = list(dict.fromkeys(GROUP_WORD[h["group"]] for h in hits))
    words = groups[0] if len(groups) == 1 else ", ".join(groups[:-1]) + " and " + groups[-1]
    detail = ", ".join(f"{h['metric']}.{h['feature']} {h['value']:.2f} >= {h['threshold']:g}" for h in hits[:n])
    return f"{words} drift ({detail})"


def _window_label(start: date, end: date) -> str:
    last = end - timedelta(days=1)
    return start.isoformat() if last == start else f"{start.isoformat()}..{last.isoformat()}"


# -- the daily run ---------------------------------------------------------------------------------------
def plan_check(cfg: PipelineConfig, params: dict, *, dag_id: str, run_id: str, run_type: str,
               reference: datetime | date | None, interval: tuple[datetime | None, datetime | None] = (None, None)
               ) -> dict:
    """Validate a drift run's parameters and fix its window: explicit params, else the data interval of a
    scheduled run (the day before 02:00 UTC), else the last drift.window_days days before the logical date."""
    reason = params_.reason_of(params)
    models = params_.models_of(params, cfg.drift_models, "monitored")
    scheduled = "scheduled" in run_type.lower()
    window = params_.explicit_window(params)
    if window is not None:
        start, end = window
    elif scheduled and interval[0] is not None and interval[1] is not None:
        start, end = interval[0].date(), interval[1].date()
    else:
        ref = params_.reference_day(reference)
        start, end = ref - timedelta(days=cfg.drift.window_days), ref
    params_.check_window(start, end, params_.MAX_DRIFT_DAYS, "drift window")
    days = int(params.get("recalibration_days") or 30)
    ctx = tracking.RunContext(dag_id=dag_id, run_id=run_id, reason=reason, trigger="scheduled" if scheduled else "manual")
    log.info("drift check %s (%s): %s | traffic [%s, %s) | models %s", run_id, ctx.trigger, reason, start, end, models)
    return {"ctx": ctx.to_dict(), "window": {"start": start.isoformat(), "end": end.isoformat()}, "models": models,
            "recalibration_days": days}


def recalibration_request(cfg: PipelineConfig, plan: dict, check: dict) -> dict | None:
    """The conf of the recalibration run to trigger, or None (nothing drifted, or drift.trigger is off). Its window
    ends with the checked traffic, so the drifted days are part of the new calibration data."""
    if not check["drifted"]:
        log.info("no drift in %s..%s: no recalibration", check["window"]["start"], check["window"]["end"])
        return None
    if not cfg.drift.trigger:
        log.warning("%s; drift.trigger is off: reported only, no recalibration triggered", check["reason"])
        return None
    end = date.fromisoformat(check["window"]["end"])
    conf = {"reason": check["reason"], "models": check["drifted"], "triggered_by": "drift",
            "window_start": (end - timedelta(days=plan["recalibration_days"])).isoformat(), "window_end": end.isoformat()}
    log.info("triggering quarterly_recalibration for %s on traffic [%s, %s): %s", conf["models"], conf["window_start"],
             conf["window_end"], conf["reason"])
    return conf


# -- the monitor -------------------------------------------------------------------------------------------
def monitor(cfg: PipelineConfig, window_start: date, window_end: date, ctx: tracking.RunContext,
            models: list[str] | None = None) -> dict:
    """Compare the traffic logged in [window_start, window_end) with each champion's calibration-time reference,
    log one MLflow run per model, and say which models drifted and why (XCom-sized)."""
    from qat_tasks.core import registry

    dcfg = cfg.drift
    names = list(models or cfg.drift_models)
    unknown = [m for m in names if m not in cfg.drift_models]
    if unknown:
        raise DriftError(f"models {unknown} are not monitored; drift models of profile {cfg.profile}: {cfg.drift_models}")
    client = tracking.configure(cfg)
    label = _window_label(window_start, window_end)
    # Review labels of the window's turns, written then or up to calibration.label_lookahead_days after it.
    labels, _ = read_labels([cfg.serving_log_dir], window_start,
                            window_end + timedelta(days=cfg.calibration.label_lookahead_days), cfg.traffic.s3_endpoint_url)
    reviewed: list[tuple[str, str, str]] = []
    try:
        records, read = sample_traffic(cfg.serving_log_dir, window_start, window_end, dcfg.max_rows,
                                       cfg.calibration.seed, cfg.traffic.s3_endpoint_url, labels, reviewed)
    except FileNotFoundError:  # no service has logged there yet: every model gets "insufficient data"
        log.warning("no traffic log folder at %s (serving.log_dir, else traffic.source)", cfg.serving_log_dir)
        records, read = [], Counter()
    read["labels"] = labels.records
    log.info("traffic %s under %s: %d valid request(s) in %d file(s), %d invalid line(s), %d shadow mirror(s) "
             "left out; %d sampled", label, cfg.serving_log_dir, read["valid"], read["files"], read["invalid"],
             read["shadow_skipped"], len(records))
    out: dict[str, dict] = {}
    drifted: list[str] = []
    parts: list[str] = []
    keys: list[str] = []
    for name in names:
        champion = registry.alias_version(client, tracking.registered_name(cfg, name), registry.CHAMPION)
        if champion is None:
            log.info("%s: no @champion registered yet: nothing to monitor", name)
            out[name] = {"verdict": "skipped", "why": "no @champion registered", "drift_score": None,
                         "top_features": [], "run_id": None}
            continue
        result = _check_model(cfg, name, champion, records, read, window_start, window_end, ctx, reviewed)
        out[name] = result
        if result["verdict"] == "drifted":
            drifted.append(name)
            parts.append(f"{name} {result['explanation']}")
            keys.append(f"{name}.v{result['champion_version']}.{result['calibration_version']}")
    drift_key = "__".join(keys) or None
    if drift_key and len(drift_key) > 200:  # it names the triggered DAG run: keep it a readable, valid run id
        drift_key = f"{len(keys)}-models-{hashlib.sha256(drift_key.encode()).hexdigest()[:16]}"
    reason = None
    if drifted:
        reason = f"drift monitor: {'; '.join(parts)} on {label}"
        if len(reason) > params_.MAX_REASON_CHARS:
            reason = reason[:params_.MAX_REASON_CHARS - 1] + "…"
    return {"window": {"start": window_start.isoformat(), "end": window_end.isoformat()}, "rows": len(records),
            "invalid_lines": read["invalid"], "models": out, "drifted": drifted, "reason": reason,
            # Names the drift state: one recalibration per (model, champion, calibration) until that changes.
            "drift_key": drift_key}


def reviewed_figures(cfg: PipelineConfig, served: str, reviewed: list[tuple[str, str, str]]) -> dict:
    """How the served version's answers in the window compare with people's reviews of them: accuracy with its
    95 % Wilson interval, rare-intent accuracy and escalation recall (None where no reviewed turn counts)."""
    from qat_tasks.core.metrics import wilson_interval

    mine = [(answer, truth) for model, answer, truth in reviewed if model == served]

    def share(pairs) -> float | None:
        return sum(a == t for a, t in pairs) / len(pairs) if pairs else None

    correct = sum(a == t for a, t in mine)
    low, high = wilson_interval(correct, len(mine))
    rare = [(a, t) for a, t in mine if t in cfg.calibration.rare_intents]
    escalations = [(a, t) for a, t in mine if t == "escalation"]
    return {"turns": len(mine), "accuracy": share(mine), "accuracy_ci95": [round(low, 4), round(high, 4)],
            "rare_accuracy": share(rare), "rare_turns": len(rare), "escalation_recall": share(escalations),
            "escalation_turns": len(escalations), "other_versions_turns": len(reviewed) - len(mine)}


def _check_model(cfg: PipelineConfig, name: str, champion, records: list[dict], read: Counter, start: date,
                 end: date, ctx: tracking.RunContext, reviewed: list[tuple[str, str, str]]) -> dict:
    import mlflow

    from qat_tasks.core import registry

    dcfg = cfg.drift
    exp_id = tracking.ensure_experiment(cfg, name)
    key = f"{ctx.run_id}:{name}:drift"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        log.info("%s: drift check of this DAG run already logged in run %s", name, cached["run_id"])
        return cached
    version = str(champion.version)
    calibration_version = champion.tags.get("calibration_version")
    if not calibration_version:
        raise DriftError(f"{name} v{version} (@champion) has no calibration_version tag: its calibration-time "
                         f"statistics cannot be found. Recalibrate to register a champion with its lineage.")
    label = _window_label(start, end)
    with tempfile.TemporaryDirectory(prefix="drift-") as tmp:
        model = _download(cfg, name, version, Path(tmp))
        reference = _reference_for(cfg, name, model, calibration_version)
        enough = len(records) >= dcfg.min_rows
        live = statistics.text_statistics(model["hf"], model["meta"], records, seed=cfg.calibration.seed) if enough else None
    tags = {**ctx.tags(), "stage": "drift-check", "model.version": version, "calibration.version": calibration_version,
            "drift.reference": reference["uri"], "window.start": start.isoformat(), "window.end": end.isoformat()}
    with tracking.stage_run(exp_id, key, f"drift check {label}", tags) as run:
        mlflow.log_params({"window_start": start.isoformat(), "window_end": end.isoformat(),
                           "psi_threshold": dcfg.psi_threshold, "ks_threshold": dcfg.ks_threshold, "bins": dcfg.bins,
                           "min_rows": dcfg.min_rows, "max_rows": dcfg.max_rows, "features": ",".join(dcfg.features),
                           "rows.live": len(records), "rows.reference": reference["rows"],
                           "reference.source": reference["source"]["kind"], "traffic": cfg.serving_log_dir})
        mlflow.log_metrics({"rows.live": len(records), "lines.invalid": read["invalid"]})
        figures = None
        if cfg.model(name).role in SERVED_ROLES:  # the service logs this model's answers: people reviewed them
            figures = reviewed_figures(cfg, registry.served_model(tracking.registered_name(cfg, name), version), reviewed)
            mlflow.log_metrics({f"reviewed.{k}": v for k, v in (
                ("turns", figures["turns"]), ("accuracy", figures["accuracy"]),
                ("accuracy_ci95_low", figures["accuracy_ci95"][0]), ("accuracy_ci95_high", figures["accuracy_ci95"][1]),
                ("rare_accuracy", figures["rare_accuracy"]), ("escalation_recall", figures["escalation_recall"]))
                if v is not None and (k == "turns" or figures["turns"])})
            log.info("%s v%s: %s", name, version, _reviewed_text(figures, read["labels"]))
        if not enough:
            why = (f"{len(records)} request(s) logged in {label}, fewer than drift.min_rows={dcfg.min_rows}: "
                   f"no verdict")
            log.warning("%s v%s: %s", name, version, why)
            result = {"verdict": "insufficient data", "why": why, "drift_score": None, "top_features": []}
        else:
            result = _log_comparison(name, version, reference, live, dcfg, label)
        mlflow.set_tags({"drift.verdict": result["verdict"], "mlflow.note.content": f"drift check {label}: "
                         f"{result.get('explanation') or result.get('why') or result['verdict']}"})
        result.update(run_id=run.info.run_id, champion_version=version, calibration_version=calibration_version,
                      reviewed=figures)
        tracking.set_result(result)
    return result


def _reviewed_text(figures: dict, labels_read: int) -> str:
    if not figures["turns"]:
        return (f"no reviewed turn of this version in the window ({labels_read} review label(s) read): "
                f"no reviewed figures")
    lo, hi = figures["accuracy_ci95"]
    out = f"{figures['turns']} reviewed turn(s): accuracy {figures['accuracy']:.3f} (95 % CI {lo:.3f}-{hi:.3f})"
    if figures["escalation_turns"]:
        out += f", escalation recall {figures['escalation_recall']:.3f} over {figures['escalation_turns']}"
    return out


def _log_comparison(name: str, version: str, reference: dict, live: dict, dcfg: DriftConfig, label: str) -> dict:
    import mlflow

    from qat_tasks.core import plots

    cmp = compare(reference, live, dcfg)
    metrics = {"drift_score": cmp["drift_score"]}
    for row in cmp["features"]:
        metrics[f"psi.{row['feature']}"] = row["psi"]
        if row["ks"] is not None:
            metrics[f"ks.{row['feature']}"] = row["ks"]
    metrics.update({f"overflow.{layer}": share for layer, share in cmp["overflow"].items()})
    mlflow.log_metrics(metrics)
    mlflow.log_table({k: [r.get(k) for r in cmp["features"]] for k in
                      ("feature", "group", "kind", "psi", "ks", "reference", "live", "category", "reference_share",
                       "live_share")}, "drift_features.json")
    layers = sorted(set(reference["layers"]) & set(live["layers"]))
    mlflow.log_dict({"reference": {k: reference["layers"][k] for k in layers},
                     "live": {k: live["layers"][k] for k in layers},
                     "overflow": cmp["overflow"]}, "activation_ranges.json")
    psi_by_feature = {r["feature"]: r["psi"] for r in cmp["features"]}
    shown = [r["feature"] for r in cmp["features"][:6]]
    figures = {"psi_by_feature.png": plots.drift_psi(psi_by_feature, dcfg.psi_threshold,
                                                     f"{name} v{version}: PSI per feature, {label}"),
               "most_shifted_features.png": plots.drift_histograms(
                   {f: (reference["features"][f]["values"], live["features"][f]["values"]) for f in shown},
                   f"{name} v{version}: reference (calibration traffic) vs {label}")}
    for fname, fig in figures.items():
        mlflow.log_figure(fig, f"plots/{fname}")
        plots.close(fig)
    top = [{"feature": r["feature"], "psi": round(r["psi"], 3), "ks": None if r["ks"] is None else round(r["ks"], 3)}
           for r in cmp["features"][:5]]
    worst = max(cmp["overflow"].items(), key=lambda kv: kv[1], default=(None, 0.0))
    if cmp["drifted"]:
        explanation = _explain(cmp["hits"])
        log.warning("%s v%s: traffic %s has drifted from its calibration: %s; %d feature(s) past a threshold",
                    name, version, label, explanation, len({h["feature"] for h in cmp["hits"]}))
    else:
        explanation = (f"no drift (largest PSI {cmp['drift_score']:.3f} < {dcfg.psi_threshold:g}, "
                       f"largest KS {max((r['ks'] or 0.0 for r in cmp['features']), default=0.0):.3f} "
                       f"< {dcfg.ks_threshold:g})")
        log.info("%s v%s: traffic %s matches its calibration: %s", name, version, label, explanation)
    if worst[0] is not None and worst[1] > 0:
        log.info("%s v%s: %.1f%% of requests exceed the calibration-time range of %s (what INT8 would clip)",
                 name, version, 100 * worst[1], worst[0])
    return {"verdict": "drifted" if cmp["drifted"] else "stable", "drift_score": round(cmp["drift_score"], 4),
            "top_features": top, "explanation": explanation,
            "max_overflow": {"layer": worst[0], "share": round(worst[1], 4)} if worst[0] else None}
