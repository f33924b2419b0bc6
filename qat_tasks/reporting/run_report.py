"""What a quarterly run reports when it ends: closing each model's parent run, the summary lines (calibration
version, each champion's figures, each track's decision, the shadow outcome) and the memory budget of the stack at
the precisions the run chose, logged as its own MLflow run."""

from __future__ import annotations

import json
import logging

from qat_tasks.core import registry, tracking
from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)


def report(cfg: PipelineConfig, ctx: tracking.RunContext, models: list[str], calibration: dict,
           evaluations: list[dict], decisions: list[dict], llm_decisions: list[dict], shadows: list[dict],
           champions: list[dict] | None = None) -> dict:
    """Close the per-model parent runs, log the memory budget, one line per outcome and the table of what each task
    cost; returns the summary."""
    from qat_tasks.reporting import task_profile

    tracking.configure(cfg)
    for name in [ev["model"] for ev in evaluations] + [d["model"] for d in llm_decisions]:
        tracking.finish_parent(tracking.model_parent_run(cfg, name, ctx, calibration["version"]))
    evaluated = {ev["model"] for ev in evaluations} | {d["model"] for d in llm_decisions}
    skipped = [m for m in models if m not in evaluated]
    lines = [f"quarterly recalibration {ctx.run_id} ({ctx.trigger}: {ctx.reason})",
             f"  calibration version {calibration['version']} -> {calibration['uri']}",
             f"  rows: {calibration['rows']}, warnings: {calibration['warnings']}"]
    for ev in evaluations:
        m = ev["metrics"]
        lines.append(f"  {ev['model']} v{ev['version']} (FP32 champion): {ev.get('headline')}, P95 {m['p95_ms']:.1f} ms, "
                     f"{m['size_mb']:.1f} MB")
    for d in decisions:
        lines.append(f"  {d['model']} INT8: {d['decision']}"
                     + (f" ({d['method']}: {d.get('headline')}, P95 {d['metrics']['p95_ms']:.1f} ms, "
                        f"{d['metrics']['size_mb']:.1f} MB)" if d.get("registered_version") else
                        f" (failed gates: {d.get('why')})"))
        lines.extend(gate_lines(d))
    for sh in shadows:
        lines.append(f"  {sh['model']} shadow: {sh['outcome']}" + (f" -> {sh['action']}" if sh.get("action") else "")
                     + (f" ({sh['why']})" if sh.get("why") and sh.get("verdict") != "passed" else ""))
    for d in llm_decisions:
        lines.append(f"  {d['model']} 4-bit: {d['decision']}"
                     + (f" ({d['method']}: {d.get('headline')})" if d.get("registered_version") else
                        f" (failed gates: {d.get('why')})"))
        lines.extend(gate_lines(d))
    budget = None
    if llm_decisions or decisions:
        budget = log_memory_budget(cfg, ctx, calibration, evaluations, decisions, llm_decisions)
        lines.append(f"  memory budget ({cfg.memory_budget.gpu_memory_gib:g} GiB GPU): {budget['summary']}")
    if skipped:
        lines.append(f"  not run (no track for their role): {skipped}")
    lines.append(f"  MLflow: {cfg.tracking_uri}")
    for line in lines:  # one record per line: log viewers and the demo console keep them whole
        log.info(line)
    rows = task_profile.profiles_of(calibration, champions or [], evaluations, decisions, shadows, llm_decisions)
    profile = task_profile.log_run_profile(cfg, ctx, calibration, rows) if rows else None
    return {"calibration_version": calibration["version"], "evaluated": sorted(evaluated), "skipped": skipped,
            "challengers": {d["model"]: d.get("registered_version") for d in [*decisions, *llm_decisions]},
            "shadows": {sh["model"]: sh.get("action") or sh["outcome"] for sh in shadows},
            "memory_budget": budget, "task_profile": profile}


def gate_lines(decision: dict) -> list[str]:
    """The finalist's gates as the decision judged them: loss, interval, tolerance, verdict (and what is missing)."""
    out = []
    for g in decision.get("gates") or []:
        if g["loss"] is None:
            continue
        interval = "" if g["ci_low"] is None else f" [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        more = (f"; about {g['more_units_needed']} more {g['unit']}" if g.get("more_units_needed") else "")
        out.append(f"    {g['candidate']} {g['gate']}: loss {g['loss']:+.3f}{interval} vs tolerance {g['tolerance']:g} "
                   f"on {g['units']} {g['unit']} -> {g['verdict']}{more}")
    return out


def log_memory_budget(cfg: PipelineConfig, ctx, calibration: dict, evaluations: list[dict], decisions: list[dict],
                      llm_decisions: list[dict]) -> dict:
    """The five models at their chosen precisions, from the real artifacts of this run, against the GPU; and
    the production stack computed from parameter counts. Logged as its own MLflow run."""
    import mlflow

    from qat_tasks.reporting import memory_budget as mb

    chosen = {d["model"]: d for d in decisions if d.get("registered_version")}
    models = []
    for ev in evaluations:
        d = chosen.get(ev["model"])
        size = (d or ev)["metrics"]["size_mb"] * 1e6
        models.append({"name": ev["model"], "precision": "int8" if d else "fp32", "bytes": size, "source": "measured"})
    for d in llm_decisions:
        m = d.get("metrics") if d.get("registered_version") else d.get("unquantized")
        if m:
            models.append({"name": d["model"], "precision": f"w4a16 {d.get('method', '')}".strip()
                           if d.get("registered_version") else "fp32", "bytes": m["size_mb"] * 1e6,
                           "source": "measured"})
    # Models this run did not touch count with what their registry aliases serve (@challenger, else @champion).

    covered = {m["name"] for m in models}
    for mc in cfg.models:
        if mc.name in covered:
            continue
        for alias in (registry.CHALLENGER, registry.CHAMPION):
            try:
                size = registry.served_size_bytes(tracking.registered_name(cfg, mc.name), alias)
            except Exception:  # the budget is a report: a registry hiccup must not fail the run
                log.warning("memory budget: could not read the size of %s@%s", mc.name, alias, exc_info=True)
                size = None
            if size:
                models.append({"name": mc.name, "precision": f"registered @{alias}", "bytes": size,
                               "source": "measured"})
                break
    shape = None
    for d in llm_decisions:  # the run's LLM shape gives its KV-cache row (read from config.json, no weights)
        from qat_tasks.llm import model as llm_model

        local = llm_model.resolve_llm(cfg, cfg.model(d["model"]).source)
        shape = mb.LlamaShape.from_config(json.loads((local / "config.json").read_text()))
    # The registered 4-bit candidate's stored bits per decoder weight, applied to the production LLM's layers.
    bits = next(((d["method"], d["metrics"]["average_bits"]) for d in llm_decisions
                 if d.get("registered_version") and "average_bits" in (d.get("metrics") or {})), None)
    report = mb.stack_report(cfg.memory_budget, models, shape, bits)
    for line in report["markdown"].splitlines():
        log.info(line)
    exp_id = tracking.ensure_experiment(cfg, "memory-budget")
    key = f"{ctx.run_id}:memory-budget"
    cached = tracking.cached_result(exp_id, key)
    if cached is not None:  # a rerun of this DAG run: the budget is already logged, with the same figures
        return cached
    result = {"summary": report["summary"], **report["metrics"],
              "models": [{"name": m["name"], "precision": m["precision"], "mb": m["bytes"] / 1e6} for m in models]}
    with tracking.stage_run(exp_id, key, "memory budget", {**ctx.tags(), "calibration.version": calibration["version"]}):
        mlflow.log_text(report["markdown"], "memory_budget.md")
        mlflow.log_dict(report["data"], "memory_budget.json")
        mlflow.log_metrics({k: float(v) for k, v in report["metrics"].items()})
        tracking.set_result(result)
    return result
