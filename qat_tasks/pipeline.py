"""The quarterly run, stage by stage, as plain functions over small dicts.

The Airflow DAG and the `qat-tasks` CLI both call these; what goes in and out is XCom-sized (ids, URIs,
scalar metrics), never data.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import UTC, date, datetime

from qat_tasks import resilience
from qat_tasks.config import ConfigError, PipelineConfig
from qat_tasks.tracking import RunContext

log = logging.getLogger(__name__)

MAX_WINDOW_DAYS = 400
# Encoder roles take the INT8 track (champion, candidates in ONNX Runtime); the LLM takes the 4-bit track.
TRACKS = frozenset({"intent_classifier", "escalation_detector", "reranker"})
LLM_TRACKS = frozenset({"llm"})


class ParamError(ValueError):
    """A run parameter that cannot be honoured; the message names it."""


def previous_quarter(reference: date) -> tuple[date, date]:
    """[start, end) of the calendar quarter before the one holding `reference`."""
    q_start = date(reference.year, 3 * ((reference.month - 1) // 3) + 1, 1)
    prev_month = q_start.month - 3
    start = date(q_start.year - 1, prev_month + 12, 1) if prev_month < 1 else date(q_start.year, prev_month, 1)
    return start, q_start


def plan_run(cfg: PipelineConfig, params: dict, *, dag_id: str, run_id: str, run_type: str,
             reference: datetime | date | None, interval: tuple[datetime | None, datetime | None] = (None, None)
             ) -> dict:
    """Validate a run's parameters and fix its window: explicit params, else the config's window, else the
    run's data interval (scheduled runs: the quarter that just ended), else the quarter before `reference`."""
    reason = str(params.get("reason") or "").strip()
    if len(reason) < 3:
        raise ParamError("params.reason: say why this run happens (at least 3 characters)")
    known = [m.name for m in cfg.models]
    wanted = list(params.get("models") or known)
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ParamError(f"params.models: unknown model(s) {unknown}; configured: {known}")

    start_s, end_s = params.get("window_start"), params.get("window_end")
    if bool(start_s) != bool(end_s):
        raise ParamError("params.window_start and params.window_end go together: give both or neither")
    if start_s:
        try:
            start, end = date.fromisoformat(start_s), date.fromisoformat(end_s)
        except ValueError as exc:
            raise ParamError(f"params.window_start/window_end: not an ISO date ({exc})") from None
    elif cfg.traffic.window is not None:
        start, end = cfg.traffic.window.start, cfg.traffic.window.end
    elif interval[0] is not None and interval[1] is not None and interval[1] > interval[0]:
        start, end = interval[0].date(), interval[1].date()
    else:
        ref = reference.date() if isinstance(reference, datetime) else (reference or datetime.now(UTC).date())
        start, end = previous_quarter(ref)
    if end <= start:
        raise ParamError(f"traffic window: end {end} must be after start {start}")
    if (end - start).days > MAX_WINDOW_DAYS:
        raise ParamError(f"traffic window: {(end - start).days} days is longer than {MAX_WINDOW_DAYS}")
    if start > datetime.now(UTC).date():
        raise ParamError(f"traffic window: starts in the future ({start})")

    trigger = "scheduled" if "scheduled" in run_type.lower() else str(params.get("triggered_by") or "manual")
    ctx = RunContext(dag_id=dag_id, run_id=run_id, reason=reason, trigger=trigger)
    log.info("run %s (%s): %s | window [%s, %s) | models %s", run_id, trigger, reason, start, end, wanted)
    return {"ctx": ctx.to_dict(), "window": {"start": start.isoformat(), "end": end.isoformat()}, "models": wanted}


def tracked_models(cfg: PipelineConfig, run: dict) -> list[str]:
    """The selected encoders (INT8 track)."""
    skipped = [m for m in run["models"] if cfg.model(m).role not in TRACKS | LLM_TRACKS]
    if skipped:
        log.warning("no quarterly track for %s: skipped", skipped)
    return [m for m in run["models"] if cfg.model(m).role in TRACKS]


def llm_models(cfg: PipelineConfig, run: dict) -> list[str]:
    """The selected LLMs (4-bit track)."""
    return [m for m in run["models"] if cfg.model(m).role in LLM_TRACKS]


def _ctx(run: dict) -> RunContext:
    return RunContext(**run["ctx"])


def refresh_stage(cfg: PipelineConfig, run: dict, progress: bool = True) -> dict:
    from qat_tasks.calibration import refresh_tracked

    w = run["window"]
    try:
        return refresh_tracked(cfg, date.fromisoformat(w["start"]), date.fromisoformat(w["end"]), _ctx(run),
                               progress)
    except Exception as exc:
        explained = resilience.explain(exc, "calibration refresh")
        if explained is exc:
            raise
        raise explained from exc


def champion_stage(cfg: PipelineConfig, run: dict, calibration: dict, model_name: str) -> dict:
    from qat_tasks.champion import ensure_champion

    with _marks_parent_failed(cfg, run, model_name, calibration):
        return ensure_champion(cfg, model_name, calibration["uri"], _ctx(run))


def evaluate_stage(cfg: PipelineConfig, run: dict, calibration: dict, champion: dict) -> dict:
    from qat_tasks.evaluation import evaluate_champion

    with _marks_parent_failed(cfg, run, champion["model"], calibration):
        return evaluate_champion(cfg, champion["model"], calibration["uri"], champion, _ctx(run))


def challenger_stage(cfg: PipelineConfig, run: dict, calibration: dict, champion: dict) -> dict:
    from qat_tasks.challenger import build_challenger

    with _marks_parent_failed(cfg, run, champion["model"], calibration):
        return build_challenger(cfg, champion["model"], calibration["uri"], champion, _ctx(run))


def llm_stage(cfg: PipelineConfig, run: dict, calibration: dict, model_name: str) -> dict:
    from qat_tasks.llm_track import build_llm_challenger

    with _marks_parent_failed(cfg, run, model_name, calibration):
        return build_llm_challenger(cfg, model_name, calibration["uri"], _ctx(run))


def shadow_stage(cfg: PipelineConfig, run: dict, calibration: dict, decision: dict) -> dict:
    from qat_tasks import tracking
    from qat_tasks.shadow import shadow_challenger

    with _marks_parent_failed(cfg, run, decision["model"], calibration):
        tracking.configure(cfg)
        parent = tracking.model_parent_run(cfg, decision["model"], _ctx(run), calibration["version"])
        return shadow_challenger(cfg, decision, run["window"], _ctx(run), parent)


@contextmanager
def _marks_parent_failed(cfg: PipelineConfig, run: dict, model_name: str, calibration: dict):
    """A stage that raises marks this DAG run's parent run of the model FAILED, then re-raises (an outage of
    S3 or the MLflow server as one clear ServiceUnavailableError)."""
    try:
        yield
    except Exception as exc:
        _fail_parent(cfg, run, model_name, calibration)
        explained = resilience.explain(exc, model_name)
        if explained is exc:
            raise
        raise explained from exc


def _fail_parent(cfg: PipelineConfig, run: dict, model_name: str, calibration: dict) -> None:
    from qat_tasks import tracking

    try:
        tracking.configure(cfg)
        parent = tracking.model_parent_run(cfg, model_name, _ctx(run), calibration["version"])
        tracking.finish_parent(parent, "FAILED")
    except Exception:  # the original error matters more than this bookkeeping
        log.exception("could not mark the MLflow parent run of %s as failed", model_name)


def report_stage(cfg: PipelineConfig, run: dict, calibration: dict, evaluations: list[dict],
                 decisions: list[dict] | None = None, llm_decisions: list[dict] | None = None,
                 shadows: list[dict] | None = None) -> dict:
    from qat_tasks import tracking

    tracking.configure(cfg)
    ctx = _ctx(run)
    llm_decisions = llm_decisions or []
    for name in [ev["model"] for ev in evaluations] + [d["model"] for d in llm_decisions]:
        tracking.finish_parent(tracking.model_parent_run(cfg, name, ctx, calibration["version"]))
    evaluated = {ev["model"] for ev in evaluations} | {d["model"] for d in llm_decisions}
    skipped = [m for m in run["models"] if m not in evaluated]
    lines = [f"quarterly recalibration {ctx.run_id} ({ctx.trigger}: {ctx.reason})",
             f"  calibration version {calibration['version']} -> {calibration['uri']}",
             f"  rows: {calibration['rows']}, warnings: {calibration['warnings']}"]
    for ev in evaluations:
        m = ev["metrics"]
        lines.append(f"  {ev['model']} v{ev['version']} (FP32 champion): {ev.get('headline')}, P95 {m['p95_ms']:.1f} ms, "
                     f"{m['size_mb']:.1f} MB")
    for d in decisions or []:
        lines.append(f"  {d['model']} INT8: {d['decision']}"
                     + (f" ({d['method']}: {d.get('headline')}, P95 {d['metrics']['p95_ms']:.1f} ms, "
                        f"{d['metrics']['size_mb']:.1f} MB)" if d.get("registered_version") else
                        f" (failed gates: {d.get('why')})"))
    for sh in shadows or []:
        lines.append(f"  {sh['model']} shadow: {sh['outcome']}" + (f" -> {sh['action']}" if sh.get("action") else "")
                     + (f" ({sh['why']})" if sh.get("why") and sh.get("verdict") != "passed" else ""))
    for d in llm_decisions:
        lines.append(f"  {d['model']} 4-bit: {d['decision']}"
                     + (f" ({d['method']}: {d.get('headline')})" if d.get("registered_version") else
                        f" (failed gates: {d.get('why')})"))
    budget = None
    if llm_decisions or decisions:
        from qat_tasks.llm_track import log_memory_budget

        budget = log_memory_budget(cfg, ctx, calibration, evaluations, decisions or [], llm_decisions)
        lines.append(f"  memory budget ({cfg.memory_budget.gpu_memory_gib:g} GiB GPU): {budget['summary']}")
    if skipped:
        lines.append(f"  not run (no track for their role): {skipped}")
    lines.append(f"  MLflow: {cfg.tracking_uri}")
    for line in lines:  # one record per line: log viewers and the demo console keep them whole
        log.info(line)
    return {"calibration_version": calibration["version"], "evaluated": sorted(evaluated), "skipped": skipped,
            "challengers": {d["model"]: d.get("registered_version") for d in [*(decisions or []), *llm_decisions]},
            "shadows": {sh["model"]: sh.get("action") or sh["outcome"] for sh in shadows or []},
            "memory_budget": budget}


__all__ = ["ConfigError", "ParamError", "plan_run", "previous_quarter", "refresh_stage", "champion_stage",
           "evaluate_stage", "challenger_stage", "shadow_stage", "llm_stage", "report_stage"]
