"""The fallback LLM's quarterly 4-bit track: quantize, judge against the unquantized model, register the best.

    unquantized model (qat_tasks.llm.model) ── evaluated once on the selection texts: perplexity on held-out
    │                                          Wikipedia/news text and MangaAssist conversations of the selection
    │                                          split, intent routing, generations
    ├─ per-block sensitivity (qat_tasks.llm.sensitivity): which blocks 4-bit hurts most
    ├─ each configured candidate (RTN, AWQ, GPTQ; domain or generic calibration; blocks kept at 16-bit):
    │    quantize (qat_tasks.llm.quantize, resumable chunk by chunk) → the same evaluation, size, wall time, peak RSS
    └─ decision: the gates as point rules on the selection texts screen the candidates; the screened one with the
       lowest MangaAssist perplexity, the finalist, and the unquantized model are then measured on the judging
       texts (the evaluation split's conversations, the other half of the held-out generic articles), and the
       gates (relative perplexity increase, routing-accuracy drop) are paired over text windows and routing rows;
       a finalist that passes is registered once per DAG run as @challenger (a compressed-tensors checkpoint
       that vLLM serves)

Every step is an MLflow stage run keyed by DAG run, model and step: a retried task skips what finished and
resumes a quantization from its last finished chunk of layers (the chunks live under the state folder, keyed
by calibration version and candidate).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from qat_tasks.core import isolation, plots, registry, resources, tracking
from qat_tasks.core.config import PipelineConfig
from qat_tasks.core.config_sections import LlmCandidate, LlmTrackConfig
from qat_tasks.data.calibration_set import load_manifest
from qat_tasks.llm import perplexity
from qat_tasks.llm.measurement import LlmData, evaluate, load_data
from qat_tasks.promotion import decision, gates

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"  # where a candidate run keeps its checkpoint folder



def quant_spec(tc: LlmTrackConfig, cand: LlmCandidate, num_layers: int, block_sensitivity: dict | None = None):
    """The quantizer's spec of a candidate; `block_sensitivity` ({block index: perplexity increase %}, from the
    unquantized step) is what a mixed-precision candidate's allocator reads."""
    from qat_tasks.llm.quantize import QuantSpec

    keep = ["lm_head"] if tc.keep_lm_head else []
    for b in cand.keep_blocks:
        idx = b if b >= 0 else num_layers + b
        if not 0 <= idx < num_layers:
            raise ValueError(f"keep_blocks: block {b} does not exist in a model of {num_layers} blocks")
        keep.append(rf"re:model\.layers\.{idx}\.")
    symmetric = cand.symmetric if cand.symmetric is not None else {
        "awq": tc.awq_symmetric, "gptq": tc.gptq_symmetric, "rtn": tc.rtn_symmetric, "autoround": False}[cand.method]
    if cand.average_bits is not None and not block_sensitivity:
        raise ValueError(f"candidate {cand.key}: mixed precision reads the per-block sensitivity; turn "
                         f"llm.sensitivity on")
    return QuantSpec(method=cand.method, bits=tc.bits, group_size=cand.group_size or tc.group_size,
                     symmetric=symmetric, actorder=tc.gptq_actorder if cand.method == "gptq" else None,
                     keep=tuple(keep), dampening_frac=tc.gptq_dampening, awq_n_grid=tc.awq_n_grid,
                     max_seq_len=tc.max_seq_len, chunk_layers=tc.chunk_layers,
                     rotation=None if cand.rotation == "none" else cand.rotation, observer=cand.observer,
                     autoround_iters=tc.autoround_iters, average_bits=cand.average_bits, high_bits=tc.high_bits,
                     high_group_size=tc.high_group_size,
                     block_sensitivity=tuple(sorted((int(b), float(v)) for b, v in (block_sensitivity or {}).items()))
                     if cand.average_bits is not None else (),
                     save_dtype=None if tc.checkpoint_dtype == "source" else tc.checkpoint_dtype)


def headline(m: dict) -> str:
    return (f"ppl {m['perplexity_generic']:.2f} generic / {m['perplexity_domain']:.2f} MangaAssist, "
            f"routing {100 * m['routing_accuracy']:.1f} %, {m['size_mb']:.0f} MB")


def _log_eval(res: dict, prefix: str = "") -> None:
    import mlflow

    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in res["metrics"].items()})
    mlflow.log_metrics({f"{prefix}routing_accuracy.{k}": float(v)
                        for k, v in res["routing"].get("per_intent_accuracy", {}).items()})
    mlflow.log_dict(res["routing"], "routing.json")
    mlflow.log_dict({"generations": res["generations"]}, "generations.json")


def build_llm_challenger(cfg: PipelineConfig, model_name: str, calibration_uri: str,
                         ctx: tracking.RunContext, progress: bool = True) -> dict:
    from transformers import AutoTokenizer

    from qat_tasks.llm import model as llm_model

    client = tracking.configure(cfg)
    mcfg = cfg.model(model_name)
    tc = mcfg.llm_track
    exp_id = tracking.ensure_experiment(cfg, model_name)
    manifest = load_manifest(calibration_uri, cfg.traffic.s3_endpoint_url)
    version = manifest["version"]
    base_key = f"{ctx.run_id}:{model_name}:w{tc.bits}"
    decision_key = f"{base_key}:decision"
    cached = tracking.cached_result(exp_id, decision_key)
    if cached is not None:
        log.info("%d-bit decision for this DAG run already made: %s", tc.bits, cached["decision"])
        return cached
    parent = tracking.model_parent_run(cfg, model_name, ctx, version)
    tags = {**ctx.tags(), "calibration.version": version, "model.source": mcfg.source}

    isolate = cfg.scheduling.isolate_stages
    # The first run dequantises the source checkpoint once into the state folder: in a process of its own too.
    base_dir, _ = isolation.run(llm_model.resolve_llm, cfg, mcfg.source, task=f"{model_name}: source", isolate=isolate)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = load_data(cfg, tc, calibration_uri, tokenizer)
    log.info("%s: %s", model_name, data.describe())
    work_root = cfg.state_path / "llm" / model_name / version

    # 1. The unquantized model: the reference every gate is relative to. It, each candidate and the judging of the
    # finalist run in processes of their own: what PyTorch and llm-compressor keep after a step (1 to 2 GB a
    # candidate on this model) goes back to the system when it ends.
    # What the measurements depend on: a rerun on unchanged inputs reuses them (the quantized chunks are reused by
    # their own digest too, so a changed evaluation setting re-measures without re-quantizing).
    source_files = sorted((f.name, f.stat().st_size) for f in base_dir.glob("*.safetensors"))
    inputs = (mcfg.source, source_files, version, data.describe(), tc.model_dump(exclude={"candidates"}))
    key = f"{base_key}:unquantized"
    base = tracking.cached_result(exp_id, key)
    if base is None:
        utags = {**tags, "stage": "llm-unquantized"}
        content = tracking.content_key("llm-unquantized", *inputs)
        base = tracking.reuse(cfg, exp_id, key, content, "unquantized", utags, parent)
    if base is None:
        base, _ = isolation.run(_measure_unquantized, cfg, model_name, base_dir, data, exp_id, key,
                                {**utags, tracking.CONTENT_KEY: content}, parent, progress,
                                task=f"{model_name}: unquantized", isolate=isolate)
    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]

    # 2. Candidates, each its own stage run; a finished one is never redone.
    results: dict[str, dict] = {}
    for cand in tc.candidates:
        key = f"{base_key}:{cand.key}"
        done = tracking.cached_result(exp_id, key)
        if done is not None:
            log.info("candidate %s already measured in run %s", cand.key, done["run_id"])
            results[cand.key] = done
            continue
        ctags = {**tags, "stage": "llm-candidate", "candidate": cand.key}
        # Block indices as numbers: a reference reused from MLflow comes back from JSON with string keys.
        blocks = sorted((int(b), v) for b, v in (base.get("block_sensitivity") or {}).items())
        content = tracking.content_key("llm-candidate", cand.model_dump(), blocks, *inputs)
        reused = tracking.reuse(cfg, exp_id, key, content, f"w{tc.bits} {cand.key}", ctags, parent)
        if reused is not None:
            results[cand.key] = reused
            continue
        results[cand.key], _ = isolation.run(_measure_candidate, cfg, model_name, cand, base_dir, data, num_layers,
                                             work_root, exp_id, key, {**ctags, tracking.CONTENT_KEY: content}, parent,
                                             progress, base.get("block_sensitivity"),
                                             task=f"{model_name}: {cand.key}", isolate=isolate)

    # 3. Decision.
    with tracking.stage_run(exp_id, decision_key, f"w{tc.bits}-decision", {**tags, "stage": "llm-decision"},
                            parent) as run:
        verdict = _decide(cfg, model_name, tc, base, results, client, run.info.run_id, decision_key, ctx, version,
                          lambda result, tmp: isolation.run(_judge_finalist, cfg, tc, base_dir, data, result, tmp,
                                                            task=f"{model_name}: judging", isolate=isolate)[0])
        tracking.set_result(verdict)
    return verdict


def _measure_unquantized(cfg: PipelineConfig, model_name: str, base_dir: Path, data: LlmData, exp_id: str, key: str,
                         tags: dict, parent: str, progress: bool) -> dict:
    """The unquantized model on the selection texts, and its per-block sensitivity: its own stage run."""
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.llm import bit_allocation
    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm import sensitivity as llm_sensitivity

    tracking.configure(cfg)
    mcfg = cfg.model(model_name)
    tc = mcfg.llm_track
    with tracking.stage_run(exp_id, key, "unquantized", tags, parent):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        res = evaluate(model, AutoTokenizer.from_pretrained(base_dir), data, tc)
        res["metrics"]["size_mb"] = resources.dir_size_bytes(base_dir) / 1e6
        res["metrics"]["params_m"] = llm_model.param_count(base_dir) / 1e6
        res["metrics"]["average_bits"] = bit_allocation.stored_bits(base_dir)["average_bits"]
        mlflow.log_params({"source": mcfg.source, "local_dir": str(base_dir), **data.describe()})
        _log_eval(res)
        base = {"metrics": res["metrics"], "generations": res["generations"]}
        if tc.sensitivity:
            report = llm_sensitivity.block_sensitivity(model, data.sensitivity_windows, perplexity.perplexity,
                                                       tc.bits, tc.group_size, tc.rtn_symmetric, progress=progress)
            mlflow.log_dict(report, "sensitivity.json")
            kept = sorted({c for cand in tc.candidates for b in cand.keep_blocks
                           for c in [f"block {b if b >= 0 else model.config.num_hidden_layers + b}"]})
            fig = llm_sensitivity.chart(report, f"{model_name}: perplexity when one block alone is "
                                                f"{tc.bits}-bit (RTN, g{tc.group_size})", kept)
            mlflow.log_figure(fig, "plots/sensitivity.png")
            plots.close(fig)
            base["sensitivity_top"] = report["most_sensitive"][:5]
            # What mixed-precision candidates allocate bits by: each block's perplexity increase alone at 4 bits.
            base["block_sensitivity"] = {int(r["unit"].split()[1]): r["increase_pct"] for r in report["rows"]
                                         if r["unit"].startswith("block ")}
            log.info("%s: most sensitive to %d-bit weights: %s", model_name, tc.bits, report["most_sensitive"][:5])
        tracking.set_result(base)
    return base


def _measure_candidate(cfg: PipelineConfig, model_name: str, cand: LlmCandidate, base_dir: Path, data: LlmData,
                       num_layers: int, work_root: Path, exp_id: str, key: str, tags: dict, parent: str,
                       progress: bool, block_sensitivity: dict | None = None) -> dict:
    """Quantize one candidate (resumable chunk by chunk) and measure it on the selection texts: its own stage run,
    with its quantization time and the peak memory of the process that made and measured it."""
    import mlflow

    from qat_tasks.llm import bit_allocation, checkpoint
    from qat_tasks.llm import quantize as llm_quantize

    tracking.configure(cfg)
    tc = cfg.model(model_name).llm_track
    spec = quant_spec(tc, cand, num_layers, block_sensitivity)
    texts = data.calibration_texts(cand.calibration)
    with tracking.stage_run(exp_id, key, f"w{tc.bits} {cand.key}", tags, parent) as run:
        mlflow.log_params({"candidate": cand.key, "method": cand.method, "calibration": cand.calibration,
                           "keep_blocks": list(cand.keep_blocks), "calibration_texts": len(texts),
                           **{f"spec.{k}": v for k, v in spec.__dict__.items()}})
        log.info("quantizing %s with %s (%s calibration, %d texts)", model_name, cand.method, cand.calibration,
                 len(texts))
        with resources.RssSampler() as rss:
            qres = llm_quantize.quantize(base_dir, spec, texts, work_root / cand.key / "checkpoint",
                                         work_dir=work_root / cand.key / "chunks", progress=progress)
            model, qtok = checkpoint.load_quantized(qres.output_dir)
            res = evaluate(model, qtok, data, tc)
            del model
        stored = bit_allocation.stored_bits(Path(qres.output_dir))
        res["metrics"].update({"size_mb": qres.size_bytes / 1e6, "quant_wall_s": qres.wall_s,
                               # sampled while this candidate was made and measured, in a process of its own
                               "peak_rss_mb": rss.peak_mb, "rss_growth_mb": rss.delta_mb,
                               "chunks_resumed": qres.chunks_resumed, "average_bits": stored["average_bits"],
                               "embeddings_and_head_mb": stored["embeddings_and_head_bytes"] / 1e6})
        _log_eval(res)
        mlflow.log_dict({"group_sizes": qres.group_sizes, "bits": qres.bits, "kept": qres.kept,
                         "stored_bits_per_layer": stored["per_layer"]}, "layout.json")
        if qres.allocation:
            import pandas as pd

            mlflow.log_table(pd.DataFrame(qres.allocation), "bit_allocation.json")
            fig = bit_allocation.chart(qres.allocation, f"{model_name} {cand.key}: bits per layer group, "
                                                        f"{stored['average_bits']:.2f} stored bits per weight")
            mlflow.log_figure(fig, "plots/bit_allocation.png")
            plots.close(fig)
        mlflow.set_tag("checkpoint.path", str(qres.output_dir))
        # The state folder may be lost (another worker, a cleaned disk): the decision can read it from here.
        mlflow.log_artifacts(str(qres.output_dir), CHECKPOINT_ARTIFACT)
        result = {"run_id": run.info.run_id, "metrics": res["metrics"], "generations": res["generations"],
                  "checkpoint": str(qres.output_dir), "checkpoint_artifact": CHECKPOINT_ARTIFACT,
                  "spec_hash": qres.spec_hash}
        tracking.set_result(result)
        log.info("%s %s: %s; peak memory %.0f MB", model_name, cand.key, headline(res["metrics"]), rss.peak_mb)
    return result


def _decide(cfg, model_name, tc, base, results, client, run_id, stage_key, ctx, version, judge) -> dict:
    import mlflow
    import pandas as pd

    from qat_tasks.llm import packaging

    bm = base["metrics"]
    verdicts = {k: gates.llm_gates(r["metrics"], bm, cfg.gates.llm) for k, r in results.items()}
    rows = [{"candidate": "unquantized", **bm, "passed": None, "failed_gates": ""}]
    for k, r in results.items():
        m = r["metrics"]
        rows.append({"candidate": k, **m,
                     "ppl_generic_increase_pct": 100 * (m["perplexity_generic"] / bm["perplexity_generic"] - 1),
                     "ppl_domain_increase_pct": 100 * (m["perplexity_domain"] / bm["perplexity_domain"] - 1),
                     "routing_drop_pts": 100 * (bm["routing_accuracy"] - m["routing_accuracy"]),
                     "passed": all(g.passed for g in verdicts[k]),
                     "failed_gates": ", ".join(g.gate for g in verdicts[k] if not g.passed)})
    table = pd.DataFrame(rows)
    mlflow.log_table(table, "comparison.json")
    mlflow.log_text(table.to_markdown(index=False, floatfmt=".3f"), "comparison.md")
    mlflow.log_dict({k: [g.to_dict() for g in v] for k, v in verdicts.items()}, "gates.json")
    mlflow.log_metrics({f"unquantized.{k}": float(v) for k, v in bm.items()})
    for k, r in results.items():
        mlflow.log_metrics({f"{k}.{m}": float(v) for m, v in r["metrics"].items()})
    fig = plots.perplexity_vs_size_chart(
        [{"name": r["candidate"], "size_mb": r["size_mb"], "generic_ppl": r["perplexity_generic"],
          "domain_ppl": r["perplexity_domain"]} for r in rows], None,
        f"{model_name}: {tc.bits}-bit candidates, perplexity against size on disk")
    mlflow.log_figure(fig, "plots/perplexity_vs_size.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    side = [{"prompt": p, "unquantized": base["generations"][i],
             **{k: r["generations"][i] for k, r in results.items()}} for i, p in enumerate(tc.generation_prompts)]
    mlflow.log_dict({"generations": side}, "generations.json")
    mlflow.log_text(pd.DataFrame(side).to_markdown(index=False), "generations.md")
    finding = calibration_finding(results)
    if finding:
        mlflow.set_tag("finding.calibration", finding)
        log.info("%s: %s", model_name, finding)

    registered_name = tracking.registered_name(cfg, model_name)
    earlier = decision.earlier_choice(client, registered_name, stage_key)
    screened, nothing = decision.passing(model_name, f"{tc.bits}-bit", verdicts, run_id)
    if earlier in results:
        decision.keep_earlier(model_name, earlier, screened)
        finalist = earlier
    elif nothing is not None:
        return {**nothing, "unquantized": bm}
    else:
        # Finalist: lowest MangaAssist perplexity on the selection texts, then the higher routing accuracy, then
        # the smaller checkpoint.
        finalist = min(screened, key=lambda k: (results[k]["metrics"]["perplexity_domain"],
                                                -results[k]["metrics"]["routing_accuracy"],
                                                results[k]["metrics"]["size_mb"]))
    spec_hash = results[finalist].get("spec_hash")
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        held = registry.alias_version(client, registered_name, alias)
        if spec_hash and held is not None and earlier != finalist and held.tags.get("checkpoint.spec_hash") == spec_hash:
            # Made from the same source, calibration texts, spec and library versions: the checkpoint the registry
            # already holds. Nothing new to judge or register.
            what = f"finalist {finalist} is @{alias} v{held.version}, the same checkpoint"
            mlflow.set_tags({"decision": f"{what}; nothing registered"})
            log.info("%s: %s; nothing to register", model_name, what)
            return {"model": model_name, "decision": what, "registered_version": None, "run_id": run_id,
                    "finalist": finalist, "unquantized": bm}
    with tempfile.TemporaryDirectory(prefix="llm-decision-") as tmp:
        final, base_eval, outcome = judge(results[finalist], Path(tmp))
        gate_rows = gates.table(finalist, outcome)
        mlflow.log_table(pd.DataFrame(gate_rows), "gate_table.json")
        mlflow.log_metrics({**{f"finalist.{k}": float(v) for k, v in final.items()},
                            **{f"unquantized.judged.{k}": float(v) for k, v in base_eval.items()}})
        fig = plots.gate_intervals(gate_rows, f"{model_name}: {finalist} against the unquantized model on the "
                                              f"judging texts")
        mlflow.log_figure(fig, "plots/gate_intervals.png")
        plots.close(fig)
        mlflow.set_tag("decision.finalist", finalist)
        refused = decision.judged(model_name, finalist, outcome, run_id)
        if refused is not None:
            return {**refused, "unquantized": bm}
        model_uri = None
        if earlier != finalist:
            meta = {"role": "llm", "method": finalist, "bits": tc.bits, "group_size": tc.group_size,
                    "calibration_version": version, "max_new_tokens": tc.max_new_tokens, "format": "compressed-tensors"}
            model_uri = packaging.log_llm(_checkpoint_of(results[finalist], Path(tmp) / "package"), meta)
    lineage = {"calibration_version": version, "candidate_run_id": results[finalist]["run_id"],
               "airflow.dag_id": ctx.dag_id, "airflow.run_id": ctx.run_id, "format": "compressed-tensors",
               "checkpoint.spec_hash": spec_hash or "",
               **decision.gate_tags(outcome)}
    out = decision.register_challenger(
        client, model_name=model_name, registered_name=registered_name, best=finalist,
        model_uri=model_uri, stage_key=stage_key, run_id=run_id, lineage=lineage,
        description=f"W{tc.bits}A16 {finalist} on calibration {version}")
    return {**out, "metrics": final, "headline": headline(final), "unquantized": bm, "gates": gate_rows}


def _judge_finalist(cfg, tc, base_dir: Path, data: LlmData, result: dict, tmp: Path):
    """The finalist and the unquantized model on the judging texts (read here only): their metrics and the gates,
    paired over text windows and routing rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.llm import checkpoint

    judge = data.judging()
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    base = evaluate(reference, AutoTokenizer.from_pretrained(base_dir), judge, tc, generations=False)
    del reference
    resources.release_memory()
    model, qtok = checkpoint.load_quantized(_checkpoint_of(result, tmp / "finalist"))
    cand = evaluate(model, qtok, judge, tc, generations=False)
    del model
    final = {**cand["metrics"], **{k: result["metrics"][k] for k in ("size_mb", "average_bits") if k in result["metrics"]}}
    base_metrics = {**base["metrics"]}
    pairing = gates.Pairing(cand["outcomes"], base["outcomes"], gates.judgement_of(cfg.gates, cfg.calibration.seed))
    return final, base_metrics, gates.llm_gates(final, base_metrics, cfg.gates.llm, pairing)


def _checkpoint_of(result: dict, tmp: Path) -> Path:
    """A candidate's checkpoint: where it was quantized when that folder is still whole, else the copy its
    candidate run logged to MLflow (the state folder is a cache: another worker, or a cleaned disk, lacks it)."""
    import mlflow

    local = Path(result["checkpoint"])
    if (local / "config.json").is_file() and any(local.glob("*.safetensors")):
        return local
    artifact = result.get("checkpoint_artifact")
    if artifact is None:
        raise FileNotFoundError(f"the candidate checkpoint {local} is gone and its run {result['run_id']} (made before "
                                f"checkpoints were logged to MLflow) has no copy: clear the candidate's task to redo it")
    log.info("candidate checkpoint %s is not on this worker: reading it from MLflow run %s", local, result["run_id"])
    return Path(mlflow.artifacts.download_artifacts(run_id=result["run_id"], artifact_path=artifact,
                                                    dst_path=str(tmp)))


def calibration_finding(results: dict) -> str | None:
    """Does domain-matched calibration beat generic text? Compared per method on MangaAssist perplexity."""
    out = []
    for method in ("awq", "gptq"):
        d, g = results.get(f"{method}-domain"), results.get(f"{method}-generic")
        if d and g:
            dp, gp = d["metrics"]["perplexity_domain"], g["metrics"]["perplexity_domain"]
            dg, gg = d["metrics"]["perplexity_generic"], g["metrics"]["perplexity_generic"]
            verdict = "beats" if dp < gp else "does not beat"
            out.append(f"{method.upper()}: MangaAssist calibration {verdict} generic text on MangaAssist perplexity "
                       f"({dp:.3f} vs {gp:.3f}); on generic text {dg:.3f} vs {gg:.3f}")
    return "; ".join(out) or None


