"""The quarterly run, stage by stage, as plain functions over small dicts.

The Airflow DAG and the `qat-tasks` CLI both call these; what goes in and out is XCom-sized (ids, URIs,
scalar metrics), never data.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from datetime import date, datetime

from qat_tasks.core import params as params_
from qat_tasks.core import resilience
from qat_tasks.core.config import ConfigError, PipelineConfig
from qat_tasks.core.params import ParamError, previous_quarter
from qat_tasks.core.tracking import RunContext

log = logging.getLogger(__name__)

# Encoder roles take the INT8 track (champion, candidates in ONNX Runtime); the LLM takes the 4-bit track.
TRACKS = frozenset({"intent_classifier", "escalation_detector", "reranker"})
LLM_TRACKS = frozenset({"llm"})


def plan_run(cfg: PipelineConfig, params: dict, *, dag_id: str, run_id: str, run_type: str,
             reference: datetime | date | None, interval: tuple[datetime | None, datetime | None] = (None, None)
             ) -> dict:
    """Validate a run's parameters and fix its window: explicit params, else the config's window, else the
    run's data interval (scheduled runs: the quarter that just ended), else the quarter before `reference`."""
    reason = params_.reason_of(params)
    wanted = params_.models_of(params, [m.name for m in cfg.models], "configured")
    window = params_.explicit_window(params)
    if window is not None:
        start, end = window
    elif cfg.traffic.window is not None:
        start, end = cfg.traffic.window.start, cfg.traffic.window.end
    elif interval[0] is not None and interval[1] is not None and interval[1] > interval[0]:
        start, end = interval[0].date(), interval[1].date()
    else:
        start, end = previous_quarter(params_.reference_day(reference))
    params_.check_window(start, end, params_.MAX_RECALIBRATION_DAYS, "traffic window")

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
    from qat_tasks.data.refresh_run import refresh_tracked

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
    from qat_tasks.encoders.champion import ensure_champion

    with _marks_parent_failed(cfg, run, model_name, calibration):
        return ensure_champion(cfg, model_name, calibration["uri"], _ctx(run))


def evaluate_stage(cfg: PipelineConfig, run: dict, calibration: dict, champion: dict) -> dict:
    from qat_tasks.encoders.evaluation import evaluate_champion

    with _marks_parent_failed(cfg, run, champion["model"], calibration):
        result = evaluate_champion(cfg, champion["model"], calibration["uri"], champion, _ctx(run))
    if champion["model"] in cfg.drift_models:  # what the daily drift monitor will compare traffic with
        from qat_tasks.monitoring.reference import store_at_calibration

        store_at_calibration(cfg, champion["model"], champion["version"], calibration["uri"], result["run_id"])
    return result


def challenger_stage(cfg: PipelineConfig, run: dict, calibration: dict, champion: dict) -> dict:
    from qat_tasks.encoders.int8.track import build_challenger

    with _marks_parent_failed(cfg, run, champion["model"], calibration):
        return build_challenger(cfg, champion["model"], calibration["uri"], champion, _ctx(run))


def llm_stage(cfg: PipelineConfig, run: dict, calibration: dict, model_name: str) -> dict:
    from qat_tasks.llm.track import build_llm_challenger

    with _marks_parent_failed(cfg, run, model_name, calibration):
        return build_llm_challenger(cfg, model_name, calibration["uri"], _ctx(run))


def shadow_stage(cfg: PipelineConfig, run: dict, calibration: dict, decision: dict) -> dict:
    from qat_tasks.core import tracking
    from qat_tasks.serving.replay import shadow_challenger

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
    from qat_tasks.core import tracking

    try:
        tracking.configure(cfg)
        parent = tracking.model_parent_run(cfg, model_name, _ctx(run), calibration["version"])
        tracking.finish_parent(parent, "FAILED")
    except Exception:  # the original error matters more than this bookkeeping
        log.exception("could not mark the MLflow parent run of %s as failed", model_name)


def report_stage(cfg: PipelineConfig, run: dict, calibration: dict, evaluations: list[dict],
                 decisions: list[dict] | None = None, llm_decisions: list[dict] | None = None,
                 shadows: list[dict] | None = None, champions: list[dict] | None = None) -> dict:
    from qat_tasks.reporting.run_report import report

    return report(cfg, _ctx(run), run["models"], calibration, evaluations, decisions or [], llm_decisions or [],
                  shadows or [], champions or [])


# What a DAG task runs, by name. The heavy ones (models trained, quantized, evaluated) run in a process of their
# own under `scheduling.isolate_stages`: the worker gets all their memory back when each ends.
STAGES = {"refresh_calibration": refresh_stage, "ensure_champion": champion_stage,
          "evaluate_champion": evaluate_stage, "int8_challenger": challenger_stage,
          "llm_4bit_challenger": llm_stage, "shadow_and_promote": shadow_stage}
HEAVY_STAGES = frozenset(STAGES) - {"refresh_calibration"}


def run_task(cfg: PipelineConfig, task: str, label: str, *args) -> dict:
    """Run DAG task `task`'s stage on `args`; the result carries the task's `profile` (wall time, peak memory of
    the process that ran it, and of the worker with it), which the run report tabulates."""
    from qat_tasks.core import isolation

    isolate = cfg.scheduling.isolate_stages and task in HEAVY_STAGES
    if cfg.scheduling.isolate_stages and not isolate:
        isolation.warm_up()  # the heavy stages after this one start from a warm fork server
    result, profile = isolation.run(STAGES[task], cfg, *args, task=f"{task}[{label}]" if label else task,
                                    isolate=isolate)
    return {**result, "profile": profile}

__all__ = ["ConfigError", "ParamError", "plan_run", "previous_quarter", "refresh_stage", "champion_stage",
           "evaluate_stage", "challenger_stage", "shadow_stage", "llm_stage", "report_stage", "run_task"]
