"""Shadow deployment and review of a challenger that passed its offline gates.

  deploy    the @challenger (registered only when every offline gate passed) gets @shadow: the serving component
            mirrors live requests to it without affecting the champion's answers
  review    on mirrored traffic, live (the service's logs since deployment) or replayed (`serving.replay`: logged
            traffic of the run's window, replay conversations only, sent through both models): agreement with
            the champion (intent, escalate decision, top passage), per-class disagreement, overlap@k (reranker),
            latency deltas, unanswered mirrors, and, for the intent classifier, the quality gates again on whatever
            reviewed labels arrived. Too little evidence decides nothing: the shadow keeps running.
  act       a passed review promotes (shadow.promotion: auto) or waits for a person; a failed one takes the
            version out of shadow (`release` holds promote and rollback)
Each review is an MLflow run with its evidence in the model's experiment, and the verdict is tagged on the version.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import numpy as np

from qat_tasks.core import plots, registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.schema import INTENT_ROLE, INTENTS
from qat_tasks.data.labels import index as labels_index
from qat_tasks.promotion import gates, shadow_roles
from qat_tasks.promotion.release import PromotionError, promote
from qat_tasks.promotion.traffic import log_root, read_role_records

log = logging.getLogger(__name__)


# -- deploy ---------------------------------------------------------------------------------------------------------
def deploy(cfg: PipelineConfig, model_name: str, version: str, ctx: tracking.RunContext) -> dict:
    """Point @shadow at `version` (idempotent) and record when, so a live review knows its window."""
    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    mv = client.get_model_version(name, version)
    if mv.tags.get("gates.offline") != "passed":
        raise PromotionError(f"{name} v{version} has no record of passing the offline gates (tag gates.offline): "
                             f"only a registered @challenger goes into shadow")
    current = registry.alias_version(client, name, registry.SHADOW)
    if current is not None and str(current.version) == str(version) and "shadow.deployed_at" in mv.tags:
        return {"version": str(version), "deployed_at": mv.tags["shadow.deployed_at"], "new": False}
    now = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(name, version, "shadow.deployed_at", now)
    client.set_model_version_tag(name, version, "shadow.deployed_by", ctx.run_id)
    client.set_registered_model_alias(name, registry.SHADOW, version)
    log.info("%s v%s is now @%s: the service mirrors requests to it from its next alias poll", name, version, registry.SHADOW)
    return {"version": str(version), "deployed_at": now, "new": True}


# -- review ---------------------------------------------------------------------------------------------------------
def pair(records, name: str, champion_version, shadow_version):
    """Champion records of `champion_version` and the shadow's answers to the same requests."""
    champ_model, shadow_model = registry.served_model(name, champion_version), registry.served_model(name, shadow_version)
    champ = {r.request_id: r for r in records if r.event != "shadow_inference" and r.model == champ_model}
    shadow = {r.request_id: r for r in records if r.event == "shadow_inference" and r.model == shadow_model}
    return champ, [(champ[k], shadow[k]) for k in champ if k in shadow]


def measure(cfg: PipelineConfig, champ: dict, pairs: list) -> tuple[dict, dict, dict]:
    """(shadow metrics, champion metrics, details) on the mirrored requests."""
    from qat_tasks.core.metrics import prediction_report

    idx = {intent: i for i, intent in enumerate(INTENTS)}
    c_pred = np.array([idx[c.intent] for c, _ in pairs], dtype=int)
    s_pred = np.array([idx[s.intent] for _, s in pairs], dtype=int)
    c_lat = np.array([c.latency_ms for c, _ in pairs])
    s_lat = np.array([s.latency_ms for _, s in pairs])
    n = len(pairs)
    shadow = {"mirrored": len(champ), "answered": n, "error_rate": 1 - n / len(champ) if champ else 1.0,
              "agreement": float((c_pred == s_pred).mean()) if n else 0.0,
              "p50_ms": float(np.percentile(s_lat, 50)) if n else float("nan"),
              "p95_ms": float(np.percentile(s_lat, 95)) if n else float("nan")}
    champion = {"p50_ms": float(np.percentile(c_lat, 50)) if n else float("nan"),
                "p95_ms": float(np.percentile(c_lat, 95)) if n else float("nan")}
    per_class = {}
    for intent, i in idx.items():
        mask = c_pred == i
        if mask.any():
            per_class[intent] = {"champion_answers": int(mask.sum()),
                                 "shadow_disagrees": int((s_pred[mask] != i).sum()),
                                 "disagreement": float((s_pred[mask] != i).mean())}
    from qat_tasks.core.metrics import confusion

    details = {"per_class": per_class, "agreement_matrix": confusion(c_pred, s_pred, len(INTENTS)),
               "latency_ms": {"champion": c_lat.tolist(), "shadow": s_lat.tolist()}}
    labelled = [(c, s) for c, s in pairs if c.reviewed_label is not None]
    shadow["reviewed"] = champion["reviewed"] = len(labelled)
    if labelled:
        y = np.array([idx[c.reviewed_label] for c, _ in labelled])
        rare = list(cfg.calibration.rare_intents)
        outcomes = []
        for target, pick in ((champion, 0), (shadow, 1)):
            pred = np.array([idx[p[pick].intent] for p in labelled])
            conf = np.array([p[pick].confidence for p in labelled])
            rep = prediction_report(y, pred, conf, list(INTENTS), rare, cfg.evaluation.ece_bins)
            target.update({k: rep[k] for k in ("accuracy", "rare_class_accuracy", "macro_f1", "ece",
                                               "escalation_recall")})
            outcomes.append({"y": y, "pred": pred, "conf_t": conf, "ece_bins": cfg.evaluation.ece_bins,
                             "rare_mask": np.isin(y, [idx[r] for r in rare]), "escalation_mask": y == idx["escalation"]})
        details["outcomes"] = {"champion": outcomes[0], "shadow": outcomes[1]}  # per reviewed request, paired
    return shadow, champion, details


def review(cfg: PipelineConfig, model_name: str, records, ctx: tracking.RunContext, source: str,
           parent_run_id: str | None = None) -> dict:
    """Judge @shadow against @champion on the mirrored requests in `records` (traffic-schema records)."""
    import mlflow
    import pandas as pd

    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    exp_id = tracking.ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}:shadow-review"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        return cached
    champion_mv, shadow_mv = (registry.alias_version(client, name, a) for a in (registry.CHAMPION, registry.SHADOW))
    if champion_mv is None or shadow_mv is None:
        raise PromotionError(f"{name} needs both @champion and @shadow for a review "
                             f"(has {'@champion' if champion_mv else 'no @champion'}, "
                             f"{'@shadow' if shadow_mv else 'no @shadow'})")
    cv, sv = str(champion_mv.version), str(shadow_mv.version)
    role = cfg.model(model_name).role
    champ, pairs = pair(records, name, cv, sv)
    shadow_m, champ_m, details = (measure(cfg, champ, pairs) if role == INTENT_ROLE
                                  else shadow_roles.measure(role, champ, pairs))
    sc = cfg.shadow
    short = []
    if shadow_m["mirrored"] < sc.min_mirrored_requests:
        short.append(f"{shadow_m['mirrored']} mirrored requests < {sc.min_mirrored_requests}")
    if role == INTENT_ROLE and shadow_m["reviewed"] < sc.min_reviewed_labels:  # review labels are intents
        short.append(f"{shadow_m['reviewed']} reviewed labels < {sc.min_reviewed_labels}")
    pairing = None
    if "outcomes" in details:
        o = details["outcomes"]
        pairing = gates.Pairing(o["shadow"], o["champion"], gates.judgement_of(cfg.gates, cfg.calibration.seed))
    results = gates.shadow_gates(shadow_m, champ_m, sc, cfg.gates.intent_classifier, pairing,
                                 ", ".join(cfg.calibration.rare_intents)) if pairs else []
    if pairs and "overlap_at_k" in shadow_m:
        results.append(gates.overlap_gate(shadow_m, sc.min_overlap_at_k))
    unresolved = [r for r in results if r.insufficient and not r.passed]
    if short:
        verdict = "insufficient_evidence"
        why = "not enough evidence yet: " + "; ".join(short)
    elif unresolved and all(r.passed or r.insufficient for r in results):
        # The reviewed labels cannot tell yet: the shadow keeps running while more arrive.
        verdict = "insufficient_evidence"
        why = "the reviewed labels cannot resolve " + "; ".join(
            f"{r.gate} ({r.limit})" for r in unresolved)
    elif all(r.passed for r in results):
        verdict, why = "passed", gates.summarize(results)
    else:
        verdict, why = "failed", gates.summarize(results)

    tags = {**ctx.tags(), "stage": "shadow-review", "champion.version": cv, "shadow.version": sv,
            "review.source": source, "role": role}
    with tracking.stage_run(exp_id, key, f"shadow review v{sv} vs v{cv}", tags, parent_run_id) as run:
        mlflow.log_params({"source": source, "champion_version": cv, "shadow_version": sv,
                           **{f"shadow.{k}": v for k, v in sc.model_dump().items()}})
        mlflow.log_metrics({**{f"shadow.{k}": v for k, v in shadow_m.items() if v == v},
                            **{f"champion.{k}": v for k, v in champ_m.items() if v == v},
                            **({"p95_ratio": shadow_m["p95_ms"] / champ_m["p95_ms"]} if pairs else {})})
        mlflow.log_dict([r.to_dict() for r in results], "gates.json")
        if results:
            rows = gates.table(f"shadow v{sv}", results)
            mlflow.log_table(pd.DataFrame(rows), "gate_table.json")
            fig = plots.gate_intervals(rows, f"{model_name}: shadow v{sv} against champion v{cv} ({source})")
            mlflow.log_figure(fig, "plots/gate_intervals.png")
            plots.close(fig)
        if details["per_class"]:
            answer = "champion_intent" if role == INTENT_ROLE else "champion_decision"
            mlflow.log_table(pd.DataFrame([{answer: k, **v} for k, v in details["per_class"].items()]),
                             "per_class_disagreement.json")
        if pairs and "agreement_matrix" in details:
            fig = plots.confusion_matrix(details["agreement_matrix"], details.get("labels", list(INTENTS)),
                                         f"{model_name}: champion v{cv} (rows) vs shadow v{sv} (columns)")
            mlflow.log_figure(fig, "plots/agreement_matrix.png")
            plots.close(fig)
        if "overlap_at_k" in details:
            mlflow.log_dict({"overlap_at_k": details["overlap_at_k"]}, "overlap_at_k.json")
            fig = plots.latency_distribution({f"champion v{cv}": details["latency_ms"]["champion"],
                                              f"shadow v{sv}": details["latency_ms"]["shadow"]},
                                             f"{model_name}: latency on the same {len(pairs)} mirrored requests")
            mlflow.log_figure(fig, "plots/latency_shadow_vs_champion.png")
            plots.close(fig)
        mlflow.set_tags({"review.verdict": verdict, "review.why": why[:5000]})
        client.set_model_version_tag(name, sv, "shadow.review", verdict)
        client.set_model_version_tag(name, sv, "shadow.review_run", run.info.run_id)
        client.set_model_version_tag(name, sv, "shadow.review_champion", cv)
        # What the review judged: production promotes on a live review only (release.promote).
        client.set_model_version_tag(name, sv, "shadow.review_source", "replay" if source.startswith("replay") else "live")
        result = {"model": model_name, "verdict": verdict, "why": why, "run_id": run.info.run_id,
                  "champion_version": cv, "shadow_version": sv, "source": source,
                  "mirrored": shadow_m["mirrored"], "answered": shadow_m["answered"], "reviewed": shadow_m["reviewed"],
                  "agreement": round(shadow_m["agreement"], 4),
                  **({"overlap_at_k": round(shadow_m["overlap_at_k"], 4)} if "overlap_at_k" in shadow_m else {}),
                  "failed_gates": [r.gate for r in results if not r.passed]}
        tracking.set_result(result)
    log.info("%s shadow v%s vs champion v%s (%s): %s on %d mirrored requests (%d reviewed), agreement %.3f: %s",
             name, sv, cv, source, verdict, shadow_m["mirrored"], shadow_m["reviewed"], shadow_m["agreement"], why)
    return result


def retire(cfg: PipelineConfig, model_name: str, version: str, why: str) -> None:
    """A shadow that failed its review stops receiving traffic; its version keeps the verdict and the evidence."""
    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    held = registry.alias_version(client, name, registry.SHADOW)
    if held is not None and str(held.version) == str(version):
        client.delete_registered_model_alias(name, registry.SHADOW)
    client.set_model_version_tag(name, version, "shadow.retired", why[:500])
    log.warning("%s v%s taken out of shadow: %s", name, version, why)


def act_on(cfg: PipelineConfig, model_name: str, verdict: dict, ctx: tracking.RunContext) -> dict:
    """What a review's verdict leads to: promotion (auto), retirement (failed) or more shadowing."""
    if verdict["verdict"] == "passed":
        if cfg.shadow.promotion == "auto":
            return {**verdict, "action": promote(cfg, model_name, ctx, verdict["shadow_version"])["outcome"]}
        return {**verdict, "action": f"passed; waiting for: qat-tasks promote --model {model_name}"}
    if verdict["verdict"] == "failed":
        retire(cfg, model_name, verdict["shadow_version"], verdict["why"])
        return {**verdict, "action": f"v{verdict['shadow_version']} taken out of shadow"}
    return {**verdict, "action": "still in shadow"}


def review_live(cfg: PipelineConfig, model_name: str, ctx: tracking.RunContext, now: datetime | None = None) -> dict:
    """The shadow_review DAG: once @shadow has run for live_window_hours, review it on the service's logs."""
    from qat_tasks.data.traffic_log import read_records

    client = tracking.configure(cfg)
    name = tracking.registered_name(cfg, model_name)
    mv = registry.alias_version(client, name, registry.SHADOW)
    if mv is None:
        return {"model": model_name, "outcome": "no @shadow"}
    now = now or datetime.now(UTC)
    since = datetime.fromisoformat(mv.tags.get("shadow.deployed_at") or
                                   datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat())
    due = since + timedelta(hours=cfg.shadow.live_window_hours)
    if now < due:
        return {"model": model_name, "outcome": f"v{mv.version} in shadow until {due.isoformat(timespec='minutes')}"}
    role = cfg.model(model_name).role
    if role == INTENT_ROLE:
        found: list = []  # the review labels written in the same days, beside the mirrored turns
        records, stats = read_records(cfg.serving_log_dir, since, now, cfg.traffic.s3_endpoint_url, labels=found)
        records, joined = labels_index(found).join(records)
        log.info("%s: %d review label(s) joined to the mirrored turns (%d orphaned, %d conflicting)", model_name,
                 joined["joined"], joined["orphaned"], joined["conflicting"])
    else:  # its own log folder; review labels are intents, so none joins
        records, stats = read_role_records(log_root(cfg.serving_log_dir, model_name, role), since, now, role,
                                           cfg.traffic.s3_endpoint_url)
        joined = {"joined": 0}
    verdict = review(cfg, model_name, records, ctx, f"live {since.isoformat(timespec='minutes')}.."
                                                    f"{now.isoformat(timespec='minutes')}")
    return {**act_on(cfg, model_name, verdict, ctx), "outcome": verdict["verdict"], "invalid_lines": stats.get("invalid", 0),
            "labels_joined": joined["joined"]}
