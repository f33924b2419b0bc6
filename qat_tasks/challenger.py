"""The INT8 stage for an encoder: build candidates from the champion, measure each beside the champion in
ONNX Runtime on the same data, gate them, and register the best passing one as @challenger.

MLflow, in the model's experiment under this DAG run's parent run:
  int8 <candidate>   one run per candidate: metrics, parity, gates, plots, the ONNX graph
  int8-decision      the champion re-measured side by side, the comparison table, accuracy-against-P95 and
                     latency plots, the decision; the registered version when one passed
Each run is keyed by DAG run, model and candidate: a retried task skips candidates that finished.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qat_tasks import gates, plots, registry, tracking
from qat_tasks.calibration import load_manifest, load_split
from qat_tasks.config import PipelineConfig
from qat_tasks.metrics import expected_calibration_error, fit_temperature, softmax_t

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
GATED_METRICS = ("accuracy", "macro_f1", "rare_class_accuracy", "escalation_recall", "ece", "ece_after_ts",
                 "temperature", "p50_ms", "p95_ms", "throughput_rps", "size_mb", "model_memory_mb", "parity_agreement",
                 "parity_max_abs_logit_diff")


class Workbench:
    """Everything candidates are measured against: champion files, data, PyTorch reference logits."""

    def __init__(self, cfg: PipelineConfig, model_name: str, calibration_uri: str, champion: dict, tmp: Path):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from qat_tasks import ort_quant

        endpoint = cfg.traffic.s3_endpoint_url
        self.cfg, self.mcfg = cfg, cfg.model(model_name)
        self.paths = registry.download(champion["registered_model"], champion["version"], tmp / "champion")
        self.meta = json.loads(self.paths["meta"].read_text())
        self.labels, self.max_length = self.meta["labels"], self.meta["max_length"]
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths["hf"])
        self.hf_model = AutoModelForSequenceClassification.from_pretrained(self.paths["hf"]).eval()
        self.eval_rows = load_split(calibration_uri, "evaluation", endpoint)
        self.train_rows = load_split(calibration_uri, "qat_train", endpoint)
        self.trained: dict = {}  # QAT trainings shared by the candidates exported from them
        calib_rows = load_split(calibration_uri, "calibration", endpoint)
        self.calib_texts = [r["text"] for r in calib_rows]
        # Temperature is fitted on held-out labelled rows that the evaluation never sees.
        self.calib_y = np.array([self.labels.index(r["label"]) for r in calib_rows])
        qc = self.mcfg.quantization
        self.batches = ort_quant.calibration_batches(self.tokenizer, self.calib_texts, self.max_length,
                                                     qc.calibration_batch_size)
        self.preprocessed = ort_quant.preprocess(self.paths["onnx"], tmp / "preprocessed.onnx")
        self.parity_texts = [r["text"] for r in self.eval_rows[: qc.parity_samples]]
        enc = self.tokenizer(self.parity_texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        with torch.no_grad():
            self.reference_logits = self.hf_model(**enc).logits.numpy()

    def quality(self, onnx_path: Path) -> dict:
        """Accuracy metrics only (no latency): what per-layer sensitivity needs."""
        from qat_tasks.metrics import classification_report
        from qat_tasks.modeling import OnnxClassifier

        clf = OnnxClassifier(onnx_path, self.tokenizer, self.labels, self.max_length, threads=self.cfg.evaluation.threads)
        y = np.array([self.labels.index(r["label"]) for r in self.eval_rows])
        return classification_report(y, clf.predict_proba([r["text"] for r in self.eval_rows]), self.labels,
                                     list(self.cfg.calibration.rare_intents))

    def recipe(self, name: str, tmp: Path):
        """How candidate `name` was quantized (after it was built in this task)."""
        from qat_tasks.sensitivity import Recipe

        kind = "dynamic" if name.endswith("dynamic") else ("minmax" if name.startswith("qat") or name.endswith(
            "smoothquant") else name.removeprefix("ptq_static_"))
        if name.startswith("qat"):
            return Recipe(self.trained["distill" if "distill" in name else "labels"][0], kind)  # (pre, info, ranges)
        if name == "ptq_static_smoothquant":
            return Recipe(tmp / name / "smoothed_pre.onnx", kind)
        return Recipe(self.preprocessed, kind)

    def measure(self, onnx_path: Path) -> dict:
        from qat_tasks.evaluation import evaluate_classifier
        from qat_tasks.modeling import OnnxClassifier

        clf = OnnxClassifier(onnx_path, self.tokenizer, self.labels, self.max_length, threads=self.cfg.evaluation.threads)
        report = evaluate_classifier(clf, self.eval_rows, self.labels, self.cfg)
        cal_logits = np.concatenate([clf.logits(self.calib_texts[i:i + 64]) for i in range(0, len(self.calib_texts), 64)])
        t = fit_temperature(cal_logits, self.calib_y)
        eval_logits = np.log(np.clip(report["probs"], 1e-12, None))  # log-softmax: same argmax, shift-invariant
        probs_t = softmax_t(eval_logits, t)
        report["temperature"] = t
        report["ece_after_ts"] = expected_calibration_error(probs_t.max(1), (probs_t.argmax(1) == report["y_true"]),
                                                            self.cfg.evaluation.ece_bins)
        cand_logits = clf.logits(self.parity_texts)
        report["parity_agreement"] = float((cand_logits.argmax(1) == self.reference_logits.argmax(1)).mean())
        report["parity_max_abs_logit_diff"] = float(np.abs(cand_logits - self.reference_logits).max())
        return report


PTQ_BASELINES = ("ptq_dynamic", "ptq_static_minmax", "ptq_static_percentile", "ptq_static_entropy")


def choose_candidates(qc, max_accuracy_drop_pts: float, reviewed_fraction: float) -> tuple[tuple[str, ...], str]:
    """The seeds' rule: tolerance under one point with labels -> QAT; without labels -> QAT by distillation
    from the FP32 teacher; looser tolerance -> PTQ. PTQ baselines are always measured for comparison.
    An explicit `quantization.candidates` list overrides the rule."""
    if qc.candidates is not None:
        return tuple(qc.candidates), "configured"
    if max_accuracy_drop_pts >= 1.0:
        return PTQ_BASELINES, f"tolerance {max_accuracy_drop_pts} pts >= 1: PTQ"
    if reviewed_fraction >= qc.min_reviewed_fraction:
        return (*PTQ_BASELINES, "qat_static", "qat_dynamic"), (
            f"tolerance {max_accuracy_drop_pts} pts < 1 and {reviewed_fraction:.0%} reviewed labels: QAT")
    return (*PTQ_BASELINES, "qat_distill_static", "qat_distill_dynamic"), (
        f"tolerance {max_accuracy_drop_pts} pts < 1 and only {reviewed_fraction:.0%} reviewed labels: distillation")


def _scalars(report: dict) -> dict:
    return {k: float(report[k]) for k in GATED_METRICS if k in report and report[k] == report[k]}


def build_challenger(cfg: PipelineConfig, model_name: str, calibration_uri: str, champion: dict,
                     ctx: tracking.RunContext) -> dict:
    import mlflow

    from qat_tasks import ptq
    from qat_tasks.evaluation import log_classifier_report

    client = tracking.configure(cfg)
    mcfg = cfg.model(model_name)
    qc = mcfg.quantization
    exp_id = tracking.ensure_experiment(cfg, model_name)
    manifest = load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url)
    base_key = f"{ctx.run_id}:{model_name}:int8"
    decision_key = f"{base_key}:decision"
    cached = tracking.cached_result(exp_id, decision_key)
    if cached is not None:
        log.info("INT8 decision for this DAG run already made: %s", cached["decision"])
        return cached
    tags = {**ctx.tags(), "calibration.version": manifest["version"], "champion.version": champion["version"]}
    rare = list(cfg.calibration.rare_intents)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="int8-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Workbench(cfg, model_name, calibration_uri, champion, tmp)
        reviewed = sum(r["label_source"] == "reviewed" for r in bench.train_rows) / max(1, len(bench.train_rows))
        candidates, rule = choose_candidates(qc, cfg.gates.intent_classifier.max_accuracy_drop_pts, reviewed)
        log.info("%s INT8 candidates %s (%s)", model_name, list(candidates), rule)
        for name in candidates:
            key = f"{base_key}:{name}"
            done = tracking.cached_result(exp_id, key)
            if done is not None:
                log.info("candidate %s already measured in run %s", name, done["run_id"])
                results[name] = done
                continue
            log.info("building INT8 candidate %s of %s", name, model_name)
            with tracking.stage_run(exp_id, key, f"int8 {name}", {**tags, "stage": "int8-candidate",
                                                                  "candidate": name}, champion["parent_run_id"]) as run:
                if name.startswith("qat"):
                    from qat_tasks import qat

                    onnx_path, info = qat.build(name, bench.hf_model, bench.tokenizer, bench.labels, bench.train_rows,
                                                bench.batches, bench.max_length, mcfg.training, qc, tmp / "qat",
                                                bench.trained, lambda k, v, s: mlflow.log_metric(k, v, step=s))
                    mlflow.log_dict(info, "qat_training.json")
                else:
                    onnx_path = ptq.build(name, bench.paths["onnx"], bench.preprocessed, bench.hf_model,
                                          bench.tokenizer, bench.batches, bench.max_length, qc, tmp / name)
                report = bench.measure(onnx_path)
                mlflow.log_params({"candidate": name, "champion_version": champion["version"], "candidates.rule": rule,
                                   **{f"quantization.{k}": v for k, v in qc.model_dump().items() if k != "candidates"}})
                logged = log_classifier_report(report, bench.labels, rare, f"{model_name} {name} (ONNX Runtime)",
                                               cfg.evaluation.ece_bins)
                # Temperature, ECE after scaling and parity: what the shared report does not log.
                mlflow.log_metrics({k: v for k, v in _scalars(report).items() if k not in logged})
                mlflow.log_dict({"samples_ms": report["latency_samples_ms"]}, "latency_samples.json")
                mlflow.log_artifact(str(onnx_path), "candidate")
                results[name] = {"run_id": run.info.run_id, "metrics": _scalars(report),
                                 "onnx_artifact": f"candidate/{onnx_path.name}"}
                tracking.set_result(results[name])

        champ = _scalars(bench.measure(bench.paths["onnx"]))
        if qc.mixed_precision and not any(_passes(cfg, qc, r["metrics"], champ) for r in results.values()):
            mixed = _mixed_precision(cfg, model_name, bench, results, champ, exp_id, f"{base_key}:mixed-precision",
                                     tags, champion, tmp)
            if mixed is not None:
                results[mixed["name"]] = mixed
        with tracking.stage_run(exp_id, decision_key, "int8-decision", {**tags, "stage": "int8-decision"},
                                champion["parent_run_id"]) as run:
            decision = _decide(cfg, model_name, champ, results, client, run.info.run_id, decision_key, bench, tmp,
                               ctx, champion, manifest["version"])
            tracking.set_result(decision)
    return decision


def _verdict(cfg, qc, metrics: dict, champ: dict) -> list[gates.GateResult]:
    return gates.encoder_gates(metrics, champ, cfg.gates.intent_classifier,
                               metrics["parity_agreement"] >= qc.parity_min_agreement,
                               metrics["parity_agreement"], qc.parity_min_agreement)


def _passes(cfg, qc, metrics: dict, champ: dict) -> bool:
    return all(r.passed for r in _verdict(cfg, qc, metrics, champ))


def _mixed_precision(cfg, model_name, bench, results, champ, exp_id, key, tags, champion, tmp) -> dict | None:
    """Per-layer sensitivity of the most accurate failing candidate, then FP32 fallback until the gates pass."""
    import mlflow
    import pandas as pd

    from qat_tasks import sensitivity

    done = tracking.cached_result(exp_id, key)
    if done is not None:
        return done or None
    qc = cfg.model(model_name).quantization
    eligible = {n: r for n, r in results.items() if r["metrics"]["parity_agreement"] >= qc.parity_min_agreement}
    if not eligible:
        return None
    base = max(eligible, key=lambda n: (eligible[n]["metrics"]["accuracy"], eligible[n]["metrics"]["rare_class_accuracy"]))
    recipe = bench.recipe(base, tmp)
    log.info("%s: no candidate passed; per-layer sensitivity of %s, then FP32 fallback", model_name, base)
    with tracking.stage_run(exp_id, key, f"int8 mixed precision ({base})",
                            {**tags, "stage": "int8-mixed-precision", "candidate": base}, champion["parent_run_id"]) as run:
        sens = sensitivity.analyse(recipe, bench.quality, bench.batches, qc.percentile, tmp / "sensitivity")
        mlflow.log_table(pd.DataFrame(sens), "sensitivity.json")
        fig = plots.sensitivity(sens, f"{model_name}: per-layer sensitivity of {base}")
        mlflow.log_figure(fig, "plots/sensitivity.png")
        plots.close(fig)
        result: dict = {}
        for step, keep in enumerate(sensitivity.fallback_steps(sens, qc.max_fp32_units), 1):
            path = sensitivity.quantize(recipe, tmp / "fallback" / f"{base}_fp32_{step}.onnx", bench.batches,
                                        qc.percentile, exclude=sensitivity.nodes_of(recipe, keep))
            report = bench.measure(path)
            metrics = _scalars(report)
            passed = _passes(cfg, qc, metrics, champ)
            mlflow.log_metrics({f"fallback.{k}": v for k, v in metrics.items()}, step=step)
            log.info("%s: %s with %s in FP32: accuracy %.4f, rare-class %.4f, P95 %.2f ms -> %s", model_name, base,
                     keep, metrics["accuracy"], metrics["rare_class_accuracy"], metrics["p95_ms"],
                     "passes" if passed else "still failing")
            if passed:
                mlflow.log_artifact(str(path), "candidate")
                mlflow.log_dict({"samples_ms": report["latency_samples_ms"]}, "latency_samples.json")
                result = {"name": f"{base}+fp32[{','.join(keep)}]", "run_id": run.info.run_id, "metrics": metrics,
                          "onnx_artifact": f"candidate/{path.name}", "fp32_units": keep}
                break
        mlflow.set_tag("mixed_precision.outcome", f"passed with {result['fp32_units']} in FP32" if result else
                       f"no pass with up to {qc.max_fp32_units} FP32 units")
        tracking.set_result(result)
    return result or None


def _decide(cfg, model_name, champ, results, client, run_id, stage_key, bench, tmp, ctx, champion, cal_version) -> dict:
    import mlflow
    import pandas as pd

    qc = cfg.model(model_name).quantization
    table, verdicts = [], {}
    for name, res in results.items():
        m = res["metrics"]
        outcome = _verdict(cfg, qc, m, champ)
        verdicts[name] = outcome
        table.append({"candidate": name, **m, "passed": all(r.passed for r in outcome),
                      "failed_gates": ", ".join(r.gate for r in outcome if not r.passed)})
    table.append({"candidate": "champion (fp32)", **champ, "passed": None, "failed_gates": ""})
    mlflow.log_metrics({f"champion.{k}": v for k, v in champ.items()})
    mlflow.log_table(pd.DataFrame(table), "comparison.json")
    mlflow.log_dict({n: [r.to_dict() for r in v] for n, v in verdicts.items()}, "gates.json")
    fig = plots.accuracy_vs_latency({row["candidate"]: (row["p95_ms"], row["accuracy"], row["size_mb"], row["passed"])
                                     for row in table}, f"{model_name}: INT8 candidates against the FP32 champion")
    mlflow.log_figure(fig, "plots/accuracy_vs_p95.png")
    plots.close(fig)
    samples = {n: mlflow.artifacts.load_dict(f"runs:/{r['run_id']}/latency_samples.json")["samples_ms"]
               for n, r in results.items()}
    fig = plots.latency_distribution(samples, f"{model_name}: batch-1 latency of the INT8 candidates")
    mlflow.log_figure(fig, "plots/latency_distributions.png")
    plots.close(fig)

    passing = [n for n, v in verdicts.items() if all(r.passed for r in v)]
    for name, outcome in verdicts.items():
        log.info("%s %s: %s", model_name, name, gates.summarize(outcome))
    if not passing:
        why = {n: gates.summarize(v) for n, v in verdicts.items()}
        mlflow.set_tags({"decision": "no candidate passed", "decision.why": json.dumps(why)[:5000]})
        log.warning("%s: no INT8 candidate passed every gate; nothing registered", model_name)
        return {"model": model_name, "decision": "no candidate passed", "registered_version": None,
                "run_id": run_id, "why": {n: [r.gate for r in v if not r.passed] for n, v in verdicts.items()}}
    # Best = most accurate passing candidate; ties go to the faster one.
    best = max(passing, key=lambda n: (results[n]["metrics"]["accuracy"], -results[n]["metrics"]["p95_ms"]))
    onnx = Path(mlflow.artifacts.download_artifacts(run_id=results[best]["run_id"],
                                                    artifact_path=results[best]["onnx_artifact"], dst_path=str(tmp / "win")))
    meta = {**bench.meta, "precision": "int8", "method": best, "champion_version": champion["version"],
            "calibration_version": cal_version}
    hf_dir = tmp / "package" / "hf"
    shutil.copytree(bench.paths["hf"], hf_dir)
    model_uri = registry.log_encoder(hf_dir, onnx, meta)
    name = champion["registered_model"]
    lineage = {"calibration_version": cal_version, "champion_version": champion["version"], "method": best,
               "candidate_run_id": results[best]["run_id"], "airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id}
    version = registry.register(client, name, model_uri, stage_key, run_id, lineage,
                                f"INT8 {best} from champion v{champion['version']} on calibration {cal_version}")
    client.set_registered_model_alias(name, CHALLENGER, version)
    mlflow.set_tags({"decision": f"registered {name} v{version} as @{CHALLENGER}", "decision.method": best})
    log.info("%s: %s passed every gate; registered as version %s with alias @%s", model_name, best, version, CHALLENGER)
    return {"model": model_name, "decision": f"registered v{version} @{CHALLENGER}", "registered_version": version,
            "method": best, "run_id": run_id, "metrics": results[best]["metrics"]}
