"""Evaluation in the serving runtime: the registered ONNX graph in ONNX Runtime, on the reviewed evaluation split.

Logs business metrics (accuracy, rare-class accuracy, macro-F1, escalation recall, calibration error,
per-class precision/recall), latency (P50/P95 at batch 1, throughput at a fixed batch, fixed threads),
size on disk and peak memory, with a confusion matrix, a reliability diagram, per-class recall bars and
the latency distribution.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from qat_tasks.core import plots, registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.metrics import (
    classification_report,
    expected_calibration_error,
    fit_temperature,
    softmax_t,
)
from qat_tasks.data.calibration_set import load_manifest

log = logging.getLogger(__name__)


def evaluate_classifier(classifier, splits, role, cfg: PipelineConfig, timing: bool = True,
                        split: str = "evaluation") -> dict:
    """Quality and speed of an OnnxClassifier on one of a model's judged splits (`selection` ranks candidates,
    `evaluation` judges the one picked). Temperature scaling is fitted, and role thresholds tuned, on the
    calibration rows, which neither judged split holds. `outcomes` holds the per-row (or per-query) figures the
    paired gates resample."""
    from qat_tasks.core.resources import peak_rss_mb, rss_mb
    from qat_tasks.encoders.modeling import inputs_of, latency_profile, throughput

    ev = cfg.evaluation
    rows, tune_rows = splits[split], splits["calibration"]
    inputs = inputs_of(rows)
    y = np.array([role.labels.index(r["label"]) for r in rows])
    probs = classifier.predict_proba(inputs)
    report = classification_report(y, probs, role.labels, role.rare, ev.ece_bins)
    tune_y = np.array([role.labels.index(r["label"]) for r in tune_rows])
    tune_probs = classifier.predict_proba(inputs_of(tune_rows))
    # Log-probabilities stand in for logits: same argmax, and softmax is shift-invariant.
    t = fit_temperature(np.log(np.clip(tune_probs, 1e-12, None)), tune_y)
    probs_t = softmax_t(np.log(np.clip(probs, 1e-12, None)), t)
    report.update(role.extra_metrics(probs, y, rows, tune_probs, tune_y))
    report["temperature"] = t
    report["ece_after_ts"] = expected_calibration_error(probs_t.max(1), probs_t.argmax(1) == y, ev.ece_bins)
    report.update({"probs": probs, "y_true": y, "conf_t": probs_t.max(1), "split": split})
    report["outcomes"] = role.outcomes(report)
    if not timing:
        return report
    rss_before_batches = rss_mb()
    lat = latency_profile(classifier.logits, inputs, ev.latency_samples, ev.warmup)
    report.update({
        "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "latency_samples_ms": lat["samples_ms"],
        "throughput_rps": throughput(classifier.logits, inputs, ev.throughput_batch),
        "size_mb": classifier.size_bytes / 2**20,
        # Memory the model costs a serving process: the session's load plus what batch-32 inference grew.
        "model_memory_mb": getattr(classifier, "load_rss_mb", 0.0) + max(0.0, rss_mb() - rss_before_batches),
        "peak_rss_mb": peak_rss_mb(),
    })
    return report


OUTCOMES = "champion_outcomes.npz"


def save_outcomes(outcomes: dict, path: Path) -> None:
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in outcomes.items()})


def load_outcomes(path: Path) -> dict:
    with np.load(path) as data:
        return {k: (data[k].item() if data[k].ndim == 0 else data[k]) for k in data.files}


SCALAR_METRICS = ("accuracy", "macro_f1", "rare_class_accuracy", "escalation_recall", "escalation_precision",
                  "escalation_f1", "threshold", "alarm_rate", "ndcg_at_10", "mrr_at_10", "hit_at_1", "groups", "ece",
                  "ece_after_ts", "temperature", "p50_ms", "p95_ms", "throughput_rps", "size_mb", "model_memory_mb",
                  "peak_rss_mb")


def log_classifier_report(report: dict, labels: list[str], rare: list[str], name: str, bins: int) -> dict:
    """Log a report's metrics and figures into the active MLflow run; returns the scalar metrics."""
    import mlflow

    scalars = {k: float(report[k]) for k in SCALAR_METRICS if k in report and report[k] == report[k]}
    mlflow.log_metrics(scalars)
    for lbl, m in report["per_class"].items():
        mlflow.log_metrics({f"recall.{lbl}": m["recall"], f"precision.{lbl}": m["precision"]})
    mlflow.log_dict({k: v for k, v in report["per_class"].items()}, "per_class.json")
    probs, y = report["probs"], report["y_true"]
    figures = {
        "confusion_matrix.png": plots.confusion_matrix(report["confusion"], labels, f"{name}: confusion matrix"),
        "reliability_diagram.png": plots.reliability(probs.max(1), (probs.argmax(1) == y).astype(float), bins,
                                                     f"{name}: reliability (ECE {report['ece']:.3f})"),
        "per_class_recall.png": plots.per_class_recall({k: v["recall"] for k, v in report["per_class"].items()}, rare,
                                                       f"{name}: per-class recall"),
        "latency_distribution.png": plots.latency_distribution({name: report["latency_samples_ms"]},
                                                               f"{name}: batch-1 latency"),
    }
    for fname, fig in figures.items():
        mlflow.log_figure(fig, f"plots/{fname}")
        plots.close(fig)
    return scalars


def evaluate_champion(cfg: PipelineConfig, model_name: str, calibration_uri: str, champion: dict,
                      ctx: tracking.RunContext) -> dict:
    """Evaluate the @champion version on this calibration version's evaluation rows, in ONNX Runtime."""
    import mlflow

    from qat_tasks.data import role_splits
    from qat_tasks.encoders.modeling import OnnxClassifier
    from qat_tasks.encoders.roles import role_for

    client = tracking.configure(cfg)
    name = champion["registered_model"]
    version = champion["version"]
    manifest = load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url)
    exp_id = tracking.ensure_experiment(cfg, model_name)
    key = f"{ctx.run_id}:{model_name}:evaluate-champion"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:
        log.info("champion evaluation already logged in run %s", cached["run_id"])
        return cached

    role = role_for(cfg, model_name)
    splits = role_splits.load(cfg, model_name, calibration_uri)
    rows = splits["evaluation"]
    tags = {**ctx.tags(), "calibration.version": manifest["version"], "stage": "evaluate-champion",
            "model.version": version}
    content = tracking.content_key("evaluate-champion", name, version, splits.summary["digest"],
                                   cfg.evaluation.model_dump())
    reused = tracking.reuse(cfg, exp_id, key, content, "evaluate-champion", tags, champion["parent_run_id"])
    if reused is not None:
        _headline_on_parent(champion["parent_run_id"], reused["metrics"])
        return reused
    with tracking.stage_run(exp_id, key, "evaluate-champion", {**tags, tracking.CONTENT_KEY: content},
                            champion["parent_run_id"]) as run, \
            tempfile.TemporaryDirectory(prefix="eval-") as tmp:
        from transformers import AutoTokenizer

        paths = registry.download(name, version, Path(tmp))
        meta = json.loads(paths["meta"].read_text())
        classifier = OnnxClassifier(paths["onnx"], AutoTokenizer.from_pretrained(paths["hf"]), meta["labels"],
                                    meta["max_length"], threads=cfg.evaluation.threads,
                                    bulk_threads=cfg.evaluation.bulk_threads)
        mlflow.log_params({"model.registered_name": name, "model.version": version, "runtime": "onnxruntime",
                           "threads": cfg.evaluation.threads, "eval_rows": len(rows),
                           "calibration_version": manifest["version"], "data.digest": splits.summary["digest"]})
        mlflow.log_dict(splits.summary, "data_summary.json")
        mlflow.log_input(tracking.dataset(rows, calibration_uri, f"{model_name}-evaluation-{manifest['version']}"),
                         context="evaluation")
        report = evaluate_classifier(classifier, splits, role, cfg)
        scalars = log_classifier_report(report, role.labels, role.rare,
                                        f"{model_name} v{version} (FP32, ONNX Runtime)", cfg.evaluation.ece_bins)
        save_outcomes(report["outcomes"], Path(tmp) / OUTCOMES)
        mlflow.log_artifact(str(Path(tmp) / OUTCOMES), "evidence")  # the INT8 decision pairs its finalist with these
        client.set_model_version_tag(name, version, f"eval.{manifest['version']}.headline", role.headline(scalars))
        log.info("%s v%s on %d evaluation rows: %s; P95 %.1f ms (batch 1, %d thread(s)), %.0f req/s at batch %d, "
                 "%.1f MB", name, version, len(rows), role.headline(scalars), scalars["p95_ms"], cfg.evaluation.threads,
                 scalars["throughput_rps"], cfg.evaluation.throughput_batch, scalars["size_mb"])
        result = {"model": model_name, "version": version, "run_id": run.info.run_id, "metrics": scalars,
                  "headline": role.headline(scalars)}
        tracking.set_result(result)
    _headline_on_parent(champion["parent_run_id"], scalars)
    return result


def _headline_on_parent(parent_run_id: str, scalars: dict) -> None:
    """The parent run carries the champion's figures, so the experiment's run list compares quarters at a glance."""
    import mlflow

    mlflow.MlflowClient().log_batch(parent_run_id, metrics=[
        mlflow.entities.Metric(f"champion.{k}", v, int(time.time() * 1000), 0) for k, v in scalars.items()])


