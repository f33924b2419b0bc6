"""The INT8 stage for an encoder: build candidates from the champion, rank them on the selection split, judge
the one picked on the evaluation split, and register it as @challenger when it passes.

  candidates        each measured in ONNX Runtime on the selection split (quality, parity, latency)
  screen            the gates as point rules on the selection split against the champion there; the
                    mixed-precision search (per-layer sensitivity, FP32 fallback) runs on it too
  finalist          the best screened candidate by the role's ranking: the only one the evaluation split sees
  gates             candidate and champion on the evaluation rows, paired (bootstrap intervals of each loss against
                    its tolerance), and timed interleaved in one process in this attempt

MLflow, in the model's experiment under this DAG run's parent run:
  int8 <candidate>   one run per candidate: selection-split metrics, parity, plots, the ONNX graph
  int8-decision      the screen's comparison table and plots, the finalist's and the champion's evaluation
                     metrics, the gate table (estimate, interval, tolerance, verdict), the decision; the
                     registered version when the finalist passed
Each run is keyed by DAG run, model and candidate: a retried task skips candidates that finished, and the
decision is made once per DAG run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qat_tasks.core import plots, registry, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.data.calibration_set import load_manifest
from qat_tasks.encoders import packaging
from qat_tasks.encoders.evaluation import SCALAR_METRICS
from qat_tasks.promotion import decision, gates

log = logging.getLogger(__name__)

GATED_METRICS = (*SCALAR_METRICS, "parity_agreement", "parity_max_abs_logit_diff")


class Workbench:
    """Everything candidates are measured against: champion files, the model's rows, PyTorch reference logits."""

    def __init__(self, cfg: PipelineConfig, model_name: str, calibration_uri: str, champion: dict, tmp: Path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from qat_tasks.data import role_splits
        from qat_tasks.encoders.int8 import ort_quant
        from qat_tasks.encoders.modeling import inputs_of
        from qat_tasks.encoders.roles import role_for

        self.cfg, self.mcfg = cfg, cfg.model(model_name)
        self.calibration_uri = calibration_uri
        self.role = role_for(cfg, model_name)
        self.paths = registry.download(champion["registered_model"], champion["version"], tmp / "champion")
        self.meta = json.loads(self.paths["meta"].read_text())
        self.labels, self.max_length, self.pair = self.meta["labels"], self.meta["max_length"], self.role.pair
        if self.labels != self.role.labels:
            raise ValueError(f"{model_name} champion v{champion['version']} has labels {self.labels}; the "
                             f"{self.role.name} track expects {self.role.labels}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.paths["hf"])
        self.hf_model = AutoModelForSequenceClassification.from_pretrained(self.paths["hf"]).eval()
        self.splits = role_splits.load(cfg, model_name, calibration_uri)
        self.sel_rows, self.train_rows = self.splits["selection"], self.splits["qat_train"]
        self.trained: dict = {}  # QAT trainings shared by the candidates exported from them
        self.calib_texts = inputs_of(self.splits["calibration"])
        qc = self.mcfg.quantization
        self.batches = ort_quant.calibration_batches(self.tokenizer, self.calib_texts, self.max_length,
                                                     qc.calibration_batch_size)
        # Candidates are quantized from FP32. An INT8 champion (a promoted challenger) ships the FP32 weights it was
        # quantized from: they are exported again, never its INT8 graph re-quantized; the gates still compare each
        # candidate with the champion as it serves.
        self.source_onnx = self.paths["onnx"]
        if self.meta.get("precision", "fp32") != "fp32":
            from qat_tasks.encoders.modeling import export_onnx

            self.source_onnx = export_onnx(self.hf_model, self.tokenizer, tmp / "source" / "model.onnx",
                                           self.max_length, self.pair)
        self.preprocessed = ort_quant.preprocess(self.source_onnx, tmp / "preprocessed.onnx")
        step = max(1, len(self.sel_rows) // qc.parity_samples)  # spread over the split (and reranking groups)
        self.parity_texts = inputs_of(self.sel_rows[::step][: qc.parity_samples])
        self.reference_logits = self.reference(self.hf_model)

    def reference(self, model) -> np.ndarray:
        """PyTorch logits of `model` (the champion, or a QAT-trained student) on the parity inputs."""
        import torch

        from qat_tasks.encoders.modeling import tokenize

        with torch.no_grad():
            return model(**tokenize(self.tokenizer, self.parity_texts, self.max_length, "pt")).logits.numpy()

    def _classifier(self, onnx_path: Path):
        from qat_tasks.encoders.modeling import OnnxClassifier

        return OnnxClassifier(onnx_path, self.tokenizer, self.labels, self.max_length, threads=self.cfg.evaluation.threads,
                              bulk_threads=self.cfg.evaluation.bulk_threads)

    def quality(self, onnx_path: Path, split: str = "selection") -> dict:
        """Quality metrics only (no latency): what per-layer sensitivity (on the selection split) and the
        finalist's gates (on the evaluation split) need."""
        from qat_tasks.encoders.evaluation import evaluate_classifier

        return evaluate_classifier(self._classifier(onnx_path), self.splits, self.role, self.cfg, timing=False,
                                   split=split)

    def recipe(self, name: str, tmp: Path):
        """How candidate `name` was quantized (after it was built in this task)."""
        from qat_tasks.encoders.int8.sensitivity import Recipe

        kind = "dynamic" if name.endswith("dynamic") else ("minmax" if name.startswith("qat") or name.endswith(
            "smoothquant") else name.removeprefix("ptq_static_"))
        if name.startswith("qat"):
            return Recipe(self.trained[qat_variant(name)][0], kind)  # (pre, info, ranges, model)
        if name == "ptq_static_smoothquant":
            return Recipe(tmp / name / "smoothed_pre.onnx", kind)
        return Recipe(self.preprocessed, kind)

    def measure(self, onnx_path: Path, reference_logits: np.ndarray | None = None) -> dict:
        """Every metric of the role in ONNX Runtime on the selection split, plus parity with the PyTorch model the
        graph came from (`reference_logits`; default the champion's)."""
        from qat_tasks.encoders.evaluation import evaluate_classifier

        ref = self.reference_logits if reference_logits is None else reference_logits
        clf = self._classifier(onnx_path)
        report = evaluate_classifier(clf, self.splits, self.role, self.cfg, split="selection")
        cand_logits = clf.logits(self.parity_texts)
        report["parity_agreement"] = self.role.parity(cand_logits, ref)
        report["parity_max_abs_logit_diff"] = float(np.abs(cand_logits - ref).max())
        return report


def qat_variant(candidate: str) -> str:
    """Which QAT training a candidate is exported from (Workbench.trained key)."""
    return "distill" if "distill" in candidate else "labels"


PTQ_BASELINES = ("ptq_dynamic", "ptq_static_minmax", "ptq_static_percentile", "ptq_static_entropy")
BASELINE = "ptq_dynamic"  # every method must beat it: no calibration, no training, the speed frontier on CPU


def choose_candidates(qc, tolerance_pts: float, reviewed_fraction: float) -> tuple[tuple[str, ...], str]:
    """The candidate-selection rule: tolerance under one point with labels -> QAT; without labels -> QAT by distillation
    from the FP32 teacher; looser tolerance -> static PTQ with percentile-clipped ranges. The baseline (dynamic
    PTQ) is always built beside what the rule picks; `candidate_set: all` adds every PTQ calibration.
    An explicit `quantization.candidates` list overrides the rule."""
    if qc.candidates is not None:
        return tuple(qc.candidates), "configured"
    if tolerance_pts >= 1.0:
        picked, why = ("ptq_static_percentile",), f"tolerance {tolerance_pts:g} pts >= 1: PTQ"
    elif reviewed_fraction >= qc.min_reviewed_fraction:
        picked, why = ("qat_static", "qat_dynamic"), (
            f"tolerance {tolerance_pts:g} pts < 1 and {reviewed_fraction:.0%} reviewed labels: QAT")
    else:
        picked, why = ("qat_distill_static", "qat_distill_dynamic"), (
            f"tolerance {tolerance_pts:g} pts < 1 and only {reviewed_fraction:.0%} reviewed labels: distillation")
    base = PTQ_BASELINES if qc.candidate_set == "all" else (BASELINE,)
    return tuple(dict.fromkeys((*base, *picked))), f"{why}; with {'every PTQ calibration' if qc.candidate_set == 'all' else 'the dynamic PTQ baseline'}"


def _scalars(report: dict) -> dict:
    return {k: float(report[k]) for k in GATED_METRICS if k in report and report[k] == report[k]}


def build_challenger(cfg: PipelineConfig, model_name: str, calibration_uri: str, champion: dict,
                     ctx: tracking.RunContext) -> dict:
    import mlflow

    from qat_tasks.encoders.evaluation import log_classifier_report
    from qat_tasks.encoders.int8 import ptq

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
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="int8-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Workbench(cfg, model_name, calibration_uri, champion, tmp)
        role = bench.role
        candidates, rule = choose_candidates(qc, role.tolerance_pts(), role.labelled_fraction(bench.train_rows))
        log.info("%s INT8 candidates %s (%s)", model_name, list(candidates), rule)
        # What a candidate's measurement depends on besides its name: reruns on unchanged inputs reuse it.
        inputs = (champion["registered_model"], champion["version"], bench.splits.summary["digest"],
                  qc.model_dump(), mcfg.training.model_dump(), cfg.evaluation.model_dump())
        for name in candidates:
            key = f"{base_key}:{name}"
            done = tracking.cached_result(exp_id, key)
            if done is not None:
                log.info("candidate %s already measured in run %s", name, done["run_id"])
                results[name] = done
                continue
            ctags = {**tags, "stage": "int8-candidate", "candidate": name}
            content = tracking.content_key("int8-candidate", name, *inputs)
            reused = tracking.reuse(cfg, exp_id, key, content, f"int8 {name}", ctags, champion["parent_run_id"])
            if reused is not None:
                results[name] = reused
                continue
            log.info("building INT8 candidate %s of %s", name, model_name)
            with tracking.stage_run(exp_id, key, f"int8 {name}", {**ctags, tracking.CONTENT_KEY: content},
                                    champion["parent_run_id"]) as run:
                if name.startswith("qat"):
                    from qat_tasks.encoders.int8 import qat

                    onnx_path, info = qat.build(name, bench.hf_model, bench.tokenizer, bench.labels, bench.train_rows,
                                                bench.batches, bench.max_length, mcfg.training, qc, tmp / "qat",
                                                bench.trained, lambda k, v, s: mlflow.log_metric(k, v, step=s))
                    mlflow.log_dict(info, "qat_training.json")
                    # Parity against the QAT-trained model the graph came from, not the champion it started as.
                    reference = bench.reference(bench.trained[qat_variant(name)][3])
                else:
                    reference = None
                    onnx_path = ptq.build(name, bench.source_onnx, bench.preprocessed, bench.hf_model,
                                          bench.tokenizer, bench.batches, bench.max_length, qc, tmp / name, bench.pair)
                report = bench.measure(onnx_path, reference)
                mlflow.log_params({"candidate": name, "champion_version": champion["version"], "candidates.rule": rule,
                                   **{f"quantization.{k}": v for k, v in qc.model_dump().items() if k != "candidates"}})
                logged = log_classifier_report(report, bench.labels, role.rare, f"{model_name} {name} (ONNX Runtime)",
                                               cfg.evaluation.ece_bins)
                # Parity: what the shared report does not log.
                mlflow.log_metrics({k: v for k, v in _scalars(report).items() if k not in logged})
                mlflow.log_dict({"samples_ms": report["latency_samples_ms"]}, "latency_samples.json")
                mlflow.log_artifact(str(onnx_path), "candidate")
                results[name] = {"run_id": run.info.run_id, "metrics": _scalars(report),
                                 "onnx_artifact": f"candidate/{onnx_path.name}"}
                tracking.set_result(results[name])

        champ = _champion_on_selection(cfg, bench, exp_id, f"{base_key}:champion", inputs, tags, champion)
        if qc.mixed_precision and not any(_passes(role, qc, r["metrics"], champ) for r in results.values()) and \
                _fallback_can_help(role, qc, results, champ, model_name):
            mixed = _mixed_precision(cfg, model_name, bench, results, champ, exp_id, f"{base_key}:mixed-precision",
                                     tags, champion, tmp, inputs)
            if mixed is not None:
                results[mixed["name"]] = mixed
        with tracking.stage_run(exp_id, decision_key, "int8-decision", {**tags, "stage": "int8-decision"},
                                champion["parent_run_id"]) as run:
            verdict = _decide(cfg, model_name, champ, results, client, run.info.run_id, decision_key, bench, tmp,
                               ctx, champion, manifest["version"])
            tracking.set_result(verdict)
    return verdict


def _champion_on_selection(cfg, bench, exp_id, key, inputs, tags, champion) -> dict:
    """The champion's figures on the selection split, the screen's reference: measured once per DAG run, and once
    for all runs while its inputs stay the same."""
    done = tracking.cached_result(exp_id, key)
    if done is not None:
        return done
    ctags = {**tags, "stage": "int8-champion-selection"}
    content = tracking.content_key("int8-champion-selection", *inputs)
    reused = tracking.reuse(cfg, exp_id, key, content, "champion on selection", ctags, champion["parent_run_id"])
    if reused is not None:
        return reused
    import mlflow

    with tracking.stage_run(exp_id, key, "champion on selection", {**ctags, tracking.CONTENT_KEY: content},
                            champion["parent_run_id"]):
        champ = _scalars(bench.measure(bench.paths["onnx"]))
        mlflow.log_metrics(champ)
        tracking.set_result(champ)
    return champ


def _verdict(role, qc, metrics: dict, champ: dict) -> list[gates.GateResult]:
    return role.gates(metrics, champ, metrics["parity_agreement"] >= qc.parity_min_agreement,
                      metrics["parity_agreement"], qc.parity_min_agreement)


def _passes(role, qc, metrics: dict, champ: dict) -> bool:
    return all(r.passed for r in _verdict(role, qc, metrics, champ))


def _fallback_can_help(role, qc, results: dict, champ: dict, model_name: str) -> bool:
    """Keeping layers in FP32 wins back quality at the cost of speed: it can rescue a candidate that failed only
    quality gates, never one already too slow (an INT8 champion, whose candidates cannot be faster)."""
    for r in results.values():
        failed = {g.gate for g in _verdict(role, qc, r["metrics"], champ) if not g.passed}
        if "p95_ratio" not in failed:
            return True
    log.info("%s: every INT8 candidate failed the latency gate; FP32 fallback would only make them slower, so it "
             "is not tried", model_name)
    return False


def _mixed_precision(cfg, model_name, bench, results, champ, exp_id, key, tags, champion, tmp, inputs) -> dict | None:
    """Per-layer sensitivity of the most accurate failing candidate, then FP32 fallback until the gates pass."""
    import mlflow
    import pandas as pd

    from qat_tasks.encoders.int8 import sensitivity

    done = tracking.cached_result(exp_id, key)
    if done is not None:
        return done or None
    qc = cfg.model(model_name).quantization
    # A QAT candidate is a base only when its training is at hand (a retried task may have skipped it).
    eligible = {n: r for n, r in results.items() if r["metrics"]["parity_agreement"] >= qc.parity_min_agreement
                and (not n.startswith("qat") or qat_variant(n) in bench.trained)}
    if not eligible:
        return None
    base = max(eligible, key=lambda n: bench.role.rank_key(eligible[n]["metrics"]))
    recipe = bench.recipe(base, tmp)
    reference = bench.reference(bench.trained[qat_variant(base)][3]) if base.startswith("qat") else None
    mtags = {**tags, "stage": "int8-mixed-precision", "candidate": base}
    # The search stops at the first fallback that passes the gates: they are among its inputs.
    content = tracking.content_key("int8-mixed-precision", base, results[base]["metrics"], champ,
                                   cfg.gates.model_dump(), *inputs)
    reused = tracking.reuse(cfg, exp_id, key, content, f"int8 mixed precision ({base})", mtags,
                            champion["parent_run_id"])
    if reused is not None:
        return reused or None
    log.info("%s: no candidate passed; per-layer sensitivity of %s, then FP32 fallback", model_name, base)
    with tracking.stage_run(exp_id, key, f"int8 mixed precision ({base})", {**mtags, tracking.CONTENT_KEY: content},
                            champion["parent_run_id"]) as run:
        sens = sensitivity.analyse(recipe, bench.quality, bench.batches, qc.percentile, tmp / "sensitivity",
                                   bench.role.sensitivity_keys)
        mlflow.log_table(pd.DataFrame(sens), "sensitivity.json")
        fig = plots.sensitivity(sens, f"{model_name}: per-layer sensitivity of {base}")
        mlflow.log_figure(fig, "plots/sensitivity.png")
        plots.close(fig)
        result: dict = {}
        for step, keep in enumerate(sensitivity.fallback_steps(sens, qc.max_fp32_units), 1):
            path = sensitivity.quantize(recipe, tmp / "fallback" / f"{base}_fp32_{step}.onnx", bench.batches,
                                        qc.percentile, exclude=sensitivity.nodes_of(recipe, keep))
            report = bench.measure(path, reference)
            metrics = _scalars(report)
            passed = _passes(bench.role, qc, metrics, champ)
            mlflow.log_metrics({f"fallback.{k}": v for k, v in metrics.items()}, step=step)
            log.info("%s: %s with %s in FP32: %s, P95 %.2f ms -> %s", model_name, base, keep,
                     bench.role.headline(metrics), metrics["p95_ms"], "passes" if passed else "still failing")
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
    role = bench.role
    quality_key = role.sensitivity_keys[0]
    table, verdicts = [], {}
    for name, res in results.items():
        m = res["metrics"]
        outcome = _verdict(role, qc, m, champ)
        verdicts[name] = outcome
        table.append({"candidate": name, **m, "passed": all(r.passed for r in outcome),
                      "failed_gates": ", ".join(r.gate for r in outcome if not r.passed)})
    table.append({"candidate": "champion (fp32)", **champ, "passed": None, "failed_gates": ""})
    mlflow.log_metrics({f"selection.champion.{k}": v for k, v in champ.items()})
    mlflow.log_table(pd.DataFrame(table), "selection_comparison.json")
    mlflow.log_dict({n: [r.to_dict() for r in v] for n, v in verdicts.items()}, "selection_screen.json")
    fig = plots.accuracy_vs_latency({row["candidate"]: (row["p95_ms"], row[quality_key], row["size_mb"], row["passed"])
                                     for row in table}, f"{model_name}: INT8 candidates against the FP32 champion "
                                                        f"(selection split)", quality_key.replace("_", " "))
    mlflow.log_figure(fig, "plots/accuracy_vs_p95.png")
    plots.close(fig)
    samples = {n: mlflow.artifacts.load_dict(f"runs:/{r['run_id']}/latency_samples.json")["samples_ms"]
               for n, r in results.items()}
    fig = plots.latency_distribution(samples, f"{model_name}: batch-1 latency of the INT8 candidates")
    mlflow.log_figure(fig, "plots/latency_distributions.png")
    plots.close(fig)

    earlier = decision.earlier_choice(client, champion["registered_model"], stage_key)
    screened, nothing = decision.passing(model_name, "INT8", verdicts, run_id)
    if earlier in results:
        decision.keep_earlier(model_name, earlier, screened)
        finalist = earlier
    elif nothing is not None:
        return nothing
    else:
        # The finalist = the screened candidate best on the role's headline metric on the selection split; ties
        # go to the faster one. Only it meets the evaluation split.
        finalist = max(screened, key=lambda n: role.rank_key(results[n]["metrics"]))
    onnx = Path(mlflow.artifacts.download_artifacts(run_id=results[finalist]["run_id"],
                                                    artifact_path=results[finalist]["onnx_artifact"],
                                                    dst_path=str(tmp / "finalist")))
    graph = _digest(onnx)
    challenger = registry.alias_version(client, champion["registered_model"], registry.CHALLENGER)
    same_as = ("the champion", champion["version"]) if graph == _digest(bench.paths["onnx"]) else (
        ("@challenger", str(challenger.version)) if challenger is not None and earlier != finalist
        and challenger.tags.get("onnx.sha256") == graph else None)
    if same_as is not None:
        # The same FP32 weights, calibration and method rebuilt a graph the registry holds: nothing new to judge.
        what = f"finalist {finalist} is {same_as[0]} v{same_as[1]}, byte for byte"
        mlflow.set_tags({"decision": f"{what}; nothing registered"})
        log.info("%s: %s (same FP32 weights, calibration rows and method); nothing to register", model_name, what)
        return {"model": model_name, "decision": what, "registered_version": None, "run_id": run_id,
                "finalist": finalist}
    final, champ_eval, outcome = _judge_finalist(cfg, bench, results[finalist], onnx, finalist, tmp, model_name,
                                                 champion, ctx)
    rows = gates.table(finalist, outcome)
    mlflow.log_table(pd.DataFrame(rows), "gate_table.json")
    mlflow.log_metrics({**{f"finalist.{k}": v for k, v in final.items()},
                        **{f"champion.{k}": v for k, v in champ_eval.items()}})
    fig = plots.gate_intervals(rows, f"{model_name}: {finalist} against the champion on the evaluation split")
    mlflow.log_figure(fig, "plots/gate_intervals.png")
    plots.close(fig)
    mlflow.set_tag("decision.finalist", finalist)
    dataset = tracking.dataset(bench.splits["evaluation"], bench.calibration_uri,
                               f"{model_name}-evaluation-{cal_version}")
    mlflow.log_input(dataset, context="evaluation")
    decision.log_against_models(client, champion["registered_model"], {str(champion["version"]): champ_eval}, dataset)
    judged = decision.judged(model_name, finalist, outcome, run_id)
    if judged is not None:
        return judged
    model_uri = None if earlier == finalist else _package(bench, results[finalist], finalist, champion, cal_version,
                                                          tmp, final)
    lineage = {"calibration_version": cal_version, "champion_version": champion["version"],
               "candidate_run_id": results[finalist]["run_id"], "airflow.dag_id": ctx.dag_id,
               "airflow.run_id": ctx.run_id, "onnx.sha256": graph, **decision.gate_tags(outcome)}
    out = decision.register_challenger(
        client, model_name=model_name, registered_name=champion["registered_model"], best=finalist,
        model_uri=model_uri, stage_key=stage_key, run_id=run_id, lineage=lineage,
        description=f"INT8 {finalist} from champion v{champion['version']} on calibration {cal_version}")
    decision.log_against_models(client, champion["registered_model"],
                                {out["registered_version"]: {**final, **decision.gate_figures(rows)}}, dataset)
    return {**out, "metrics": final, "headline": role.headline(final), "gates": rows}


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _champion_evaluation(cfg, bench, champion: dict, ctx, tmp: Path) -> dict | None:
    """The champion's per-row outcomes and quality figures on the evaluation split, as this DAG run's
    evaluate-champion task logged them; None when it has none for this version (then the judge scores them)."""
    import mlflow

    from qat_tasks.encoders.evaluation import OUTCOMES, load_outcomes

    exp_id = tracking.ensure_experiment(cfg, champion["model"])
    done = tracking.cached_result(exp_id, f"{ctx.run_id}:{champion['model']}:evaluate-champion")
    if done is None or str(done.get("version")) != str(champion["version"]):
        return None
    try:
        path = mlflow.artifacts.download_artifacts(run_id=done["run_id"], artifact_path=f"evidence/{OUTCOMES}",
                                                   dst_path=str(tmp / "champion-evaluation"))
    except Exception:  # an evaluation logged before the outcomes were: score them here
        return None
    timing = {"p50_ms", "p95_ms", "throughput_rps", "size_mb", "model_memory_mb", "peak_rss_mb"}  # timed here
    return {**{k: v for k, v in done["metrics"].items() if k not in timing}, "outcomes": load_outcomes(Path(path))}


def _judge_finalist(cfg, bench, result: dict, onnx: Path, name: str, tmp: Path, model_name: str, champion: dict,
                    ctx):
    """The finalist and the champion on the evaluation split (read here only), and timed interleaved in rounds
    in this process: their metrics there and the paired gates."""
    import mlflow

    from qat_tasks.encoders.evaluation import evaluate_classifier
    from qat_tasks.encoders.modeling import inputs_of
    from qat_tasks.promotion import evidence


    # One ONNX Runtime session per model serves both the evaluation rows and the timing rounds. The champion's rows
    # were scored by its evaluation task in this DAG run, on the same graph and rows: read, not scored again.
    cand_clf, champ_clf = bench._classifier(onnx), bench._classifier(bench.paths["onnx"])
    rep_k = evaluate_classifier(cand_clf, bench.splits, bench.role, cfg, timing=False, split="evaluation")
    rep_c = _champion_evaluation(cfg, bench, champion, ctx, tmp) or evaluate_classifier(
        champ_clf, bench.splits, bench.role, cfg, timing=False, split="evaluation")
    ev = cfg.evaluation
    log.info("%s: finalist %s and the champion on %d evaluation rows; timing them interleaved in %d rounds",
             model_name, name, len(bench.splits["evaluation"]), ev.latency_rounds)
    rounds = evidence.interleaved_latency({"champion": champ_clf.logits, "candidate": cand_clf.logits},
                                          inputs_of(bench.splits["evaluation"]), ev.latency_rounds,
                                          max(1, ev.latency_samples // ev.latency_rounds), ev.warmup)
    final = {**_scalars(rep_k), **{k: result["metrics"][k] for k in ("parity_agreement", "parity_max_abs_logit_diff")
                                   if k in result["metrics"]}}
    champ_eval = _scalars(rep_c)
    for metrics, key in ((final, "candidate"), (champ_eval, "champion")):
        times = np.concatenate(rounds[key])
        metrics.update({"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                        "size_mb": result["metrics"]["size_mb"] if key == "candidate" else
                        champ_clf.size_bytes / 2**20})
    qc = cfg.model(model_name).quantization
    pairing = gates.Pairing(rep_k["outcomes"], rep_c["outcomes"], gates.judgement_of(cfg.gates, cfg.calibration.seed),
                            (rounds["champion"], rounds["candidate"]))
    outcome = bench.role.gates(final, champ_eval, final["parity_agreement"] >= qc.parity_min_agreement,
                               final["parity_agreement"], qc.parity_min_agreement, pairing)
    np.savez_compressed(tmp / "evidence.npz", **{f"candidate.{k}": np.asarray(v) for k, v in rep_k["outcomes"].items()},
                        **{f"champion.{k}": np.asarray(v) for k, v in rep_c["outcomes"].items()},
                        **{f"latency.{k}": np.stack(v) for k, v in rounds.items()})
    mlflow.log_artifact(str(tmp / "evidence.npz"), "evidence")  # what bench/gate_power.py resamples
    return final, champ_eval, outcome


def _package(bench, result: dict, best: str, champion: dict, cal_version: str, tmp: Path, final: dict) -> str:
    """The chosen candidate packaged as an encoder version's artifacts; returns the model URI."""
    import mlflow

    onnx = Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"],
                                                    artifact_path=result["onnx_artifact"], dst_path=str(tmp / "win")))
    meta = {**bench.meta, "precision": "int8", "method": best, "champion_version": champion["version"],
            "calibration_version": cal_version}
    meta.update(bench.role.packaged_settings(final))  # its own temperature or threshold (fitted on calibration rows)
    hf_dir = tmp / "package" / "hf"
    shutil.copytree(bench.paths["hf"], hf_dir)
    return packaging.log_encoder(hf_dir, onnx, meta)
