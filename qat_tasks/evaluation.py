"""Evaluation in the serving runtime: the registered ONNX graph in ONNX Runtime, on the reviewed evaluation split.

Logs business metrics (accuracy, rare-class accuracy, macro-F1, escalation recall, calibration error,
per-class precision/recall), latency (P50/P95 at batch 1, throughput at a fixed batch, fixed threads),
size on disk and peak memory, with a confusion matrix, a reliability diagram, per-class recall bars and
the latency distribution.
"""

from __future__ import annotations

import json
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from qat_tasks import plots, registry, tracking
from qat_tasks.calibration import load_manifest, load_split
from qat_tasks.config import PipelineConfig
from qat_tasks.metrics import classification_report

log = logging.getLogger(__name__)


def evaluate_classifier(classifier, rows: list[dict], labels: list[str], cfg: PipelineConfig) -> dict:
    """Quality and speed of an OnnxClassifier on labelled rows."""
    from qat_tasks.modeling import latency_profile, rss_mb, throughput

    ev = cfg.evaluation
    texts = [r["text"] for r in rows]
    y = np.array([labels.index(r["label"]) for r in rows])
    probs = classifier.predict_proba(texts)
    report = classification_report(y, probs, labels, list(cfg.calibration.rare_intents), ev.ece_bins)
    rss_before_batches = rss_mb()
    lat = latency_profile(classifier.logits, texts, ev.latency_samples, ev.warmup)
    report.update({
        "p50_ms": lat["p50_ms"], "p95_ms": lat["p95_ms"], "latency_samples_ms": lat["samples_ms"],
        "throughput_rps": throughput(classifier.logits, texts, ev.throughput_batch),
        "size_mb": classifier.size_bytes / 2**20,
        # Memory the model costs a serving process: the session's load plus what batch-32 inference grew.
        "model_memory_mb": getattr(classifier, "load_rss_mb", 0.0) + max(0.0, rss_mb() - rss_before_batches),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "probs": probs, "y_true": y,
    })
    return report


SCALAR_METRICS = ("accuracy", "macro_f1", "rare_class_accuracy", "escalation_recall", "ece", "p50_ms", "p95_ms",
                  "throughput_rps", "size_mb", "model_memory_mb", "peak_rss_mb")


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
    """Evaluate the @champion version on the evaluation split of this calibration version."""
    import mlflow

    from qat_tasks.modeling import OnnxClassifier

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

    rows = load_split(calibration_uri, "evaluation", cfg.traffic.s3_endpoint_url)
    with tracking.stage_run(exp_id, key, "evaluate-champion",
                            {**ctx.tags(), "calibration.version": manifest["version"], "stage": "evaluate-champion",
                             "model.version": version}, champion["parent_run_id"]) as run, \
            tempfile.TemporaryDirectory(prefix="eval-") as tmp:
        from transformers import AutoTokenizer

        paths = registry.download(name, version, Path(tmp))
        meta = json.loads(paths["meta"].read_text())
        classifier = OnnxClassifier(paths["onnx"], AutoTokenizer.from_pretrained(paths["hf"]), meta["labels"],
                                    meta["max_length"], threads=cfg.evaluation.threads)
        mlflow.log_params({"model.registered_name": name, "model.version": version, "runtime": "onnxruntime",
                           "threads": cfg.evaluation.threads, "eval_rows": len(rows),
                           "calibration_version": manifest["version"]})
        eval_ds = _dataset(rows, calibration_uri, f"evaluation-{manifest['version']}")
        mlflow.log_input(eval_ds, context="evaluation")
        report = evaluate_classifier(classifier, rows, meta["labels"], cfg)
        scalars = log_classifier_report(report, meta["labels"], list(cfg.calibration.rare_intents),
                                        f"{model_name} v{version} (FP32, ONNX Runtime)", cfg.evaluation.ece_bins)
        client.set_model_version_tag(name, version, f"eval.{manifest['version']}.accuracy", f"{scalars['accuracy']:.4f}")
        log.info("%s v%s on %d reviewed rows: accuracy %.3f, macro-F1 %.3f, rare-class accuracy %.3f, escalation recall "
                 "%.3f, ECE %.3f, P95 %.1f ms (batch 1, %d thread(s)), %.0f req/s at batch %d, %.1f MB",
                 name, version, len(rows), scalars["accuracy"], scalars["macro_f1"], scalars.get("rare_class_accuracy", 0),
                 scalars.get("escalation_recall", 0), scalars["ece"], scalars["p95_ms"], cfg.evaluation.threads,
                 scalars["throughput_rps"], cfg.evaluation.throughput_batch, scalars["size_mb"])
        result = {"model": model_name, "version": version, "run_id": run.info.run_id, "metrics": scalars}
        tracking.set_result(result)
    # The parent run carries the headline figures so the experiment's run list compares quarters at a glance.
    mlflow.MlflowClient().log_batch(champion["parent_run_id"], metrics=[
        mlflow.entities.Metric(f"champion.{k}", v, int(time.time() * 1000), 0) for k, v in scalars.items()])
    return result


def _dataset(rows: list[dict], source_uri: str, name: str):
    import mlflow.data
    import pandas as pd

    df = pd.DataFrame([{k: r[k] for k in ("request_id", "text", "label", "label_source", "language")} for r in rows])
    return mlflow.data.from_pandas(df, source=source_uri, name=name, targets="label")
