"""What each task of a quarterly run cost: wall time and peak memory, as a table, an MLflow run and a budget check.

Every stage task returns a `profile` with its result (qat_tasks.core.isolation). The report task tabulates the
profiles it receives and logs them (experiment `<prefix>-runs`, one run per DAG run: `task_profile.json`,
`plots/task_times.png`, metrics per task). `scripts/check_budget.py` reads the same profiles, with Airflow's own
task durations, from the metadata database after the run, and fails when the run went over `budget`.
"""

from __future__ import annotations

import logging

from qat_tasks.core import tracking
from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)


def profiles_of(*results: dict | list[dict]) -> list[dict]:
    """The `profile` of every task result given (one dict, or a mapped task's list), in the order given."""
    out = []
    for r in results:
        for item in r if isinstance(r, list) else [r]:
            if isinstance(item, dict) and isinstance(item.get("profile"), dict):
                out.append(item["profile"])
    return out


def rows_text(rows: list[dict]) -> list[str]:
    """The table as text lines: task, wall time, peak memory of its process and of the worker with it."""
    width = max([len(r["task"]) for r in rows] + [4])
    out = [f"{'task':<{width}}  {'wall':>8}  {'peak RSS':>9}  {'with worker':>11}  process"]
    for r in rows:
        peak = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb'] / 1024:.2f} GB"
        tree = "" if r.get("tree_peak_rss_mb") is None else f"{r['tree_peak_rss_mb'] / 1024:.2f} GB"
        where = "own" if r.get("isolated") else ("worker" if r.get("isolated") is False else "")
        out.append(f"{r['task']:<{width}}  {_minutes(r['wall_s']):>8}  {peak:>9}  {tree:>11}  {where}")
    return out


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def summary(rows: list[dict]) -> dict:
    """Totals: the summed task time, the highest peak of one process and of the process tree."""
    return {"tasks": len(rows), "task_wall_s": round(sum(r["wall_s"] for r in rows), 1),
            "peak_rss_mb": max((r.get("peak_rss_mb") or 0.0 for r in rows), default=0.0),
            "tree_peak_rss_mb": max((r.get("tree_peak_rss_mb") or 0.0 for r in rows), default=0.0)}


def log_run_profile(cfg: PipelineConfig, ctx: tracking.RunContext, calibration: dict, rows: list[dict]) -> dict:
    """Print the task table and log it as this DAG run's run in the `runs` experiment (once per DAG run)."""
    import mlflow
    import pandas as pd

    from qat_tasks.core import plots

    totals = summary(rows)
    for line in ["what each task cost:", *rows_text(rows),
                 f"  {totals['tasks']} stage tasks, {_minutes(totals['task_wall_s'])} in all; peak memory "
                 f"{totals['peak_rss_mb'] / 1024:.2f} GB in one process, {totals['tree_peak_rss_mb'] / 1024:.2f} GB "
                 f"with the worker"]:
        log.info(line)
    exp_id = tracking.ensure_experiment(cfg, "runs")
    key = f"{ctx.run_id}:task-profile"
    if tracking.cached_result(exp_id, key) is not None:  # a rerun of the report: the first one's table stands
        return totals
    with tracking.stage_run(exp_id, key, f"quarterly run {ctx.run_id}",
                            {**ctx.tags(), "calibration.version": calibration["version"], "stage": "run-profile"}):
        mlflow.log_table(pd.DataFrame(rows), "task_profile.json")
        mlflow.log_text("\n".join(rows_text(rows)), "task_profile.txt")
        mlflow.log_metrics({f"main_job.{k}": float(v) for k, v in totals.items()})
        for r in rows:
            name = r["task"].replace("[", ".").replace("]", "")
            mlflow.log_metrics({f"{name}.wall_s": float(r["wall_s"]),
                                f"{name}.peak_rss_mb": float(r.get("peak_rss_mb") or 0.0)})
        fig = plots.task_times(rows, f"quarterly run {ctx.run_id}: wall time and peak memory per task")
        mlflow.log_figure(fig, "plots/task_times.png")
        plots.close(fig)
        tracking.set_result(totals)
    return totals


def airflow_run(dag_id: str, run_id: str | None = None) -> dict:
    """A finished DAG run as Airflow's metadata database holds it (the newest of `dag_id` unless `run_id`): its
    state and wall time, and per task instance its state, Airflow's duration and the profile its result carried."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as s:
        query = select(DagRun).where(DagRun.dag_id == dag_id)
        if run_id is not None:
            query = query.where(DagRun.run_id == run_id)
        dr = s.scalars(query.order_by(DagRun.id.desc())).first()
        if dr is None:
            raise LookupError(f"no run of DAG {dag_id}" + (f" with run id {run_id}" if run_id else "") +
                              " in this Airflow database: run the main job first")
        profiles = {}
        for x in s.scalars(select(XComModel).where(XComModel.dag_id == dag_id, XComModel.run_id == dr.run_id,
                                                   XComModel.key == "return_value")):
            value = XComModel.deserialize_value(x)
            if isinstance(value, dict) and isinstance(value.get("profile"), dict):
                profiles[(x.task_id, x.map_index)] = value["profile"]
            if isinstance(value, dict) and x.task_id == "ensure_champion" and value.get("bootstrapped"):
                profiles.setdefault("bootstrapped", []).append(value.get("model"))
        tasks = []
        for ti in sorted(dr.get_task_instances(session=s), key=lambda t: (t.start_date is None, t.start_date)):
            prof = profiles.get((ti.task_id, ti.map_index), {})
            label = prof.get("task") or (ti.task_id + (f"[{ti.map_index}]" if ti.map_index >= 0 else ""))
            tasks.append({"task": label, "state": str(ti.state), "wall_s": round(ti.duration or 0.0, 2),
                          "peak_rss_mb": prof.get("peak_rss_mb"), "tree_peak_rss_mb": prof.get("tree_peak_rss_mb"),
                          "isolated": prof.get("isolated")})
        # From the first task's start to the last task's end: `airflow dags test` leaves the run's own start date at
        # its logical date.
        tis = dr.get_task_instances(session=s)
        starts = [ti.start_date for ti in tis if ti.start_date] or [dr.start_date]
        ends = [ti.end_date for ti in tis if ti.end_date]
        started, ended = min(starts, default=None), (max(ends) if ends and dr.end_date else None)
        return {"dag_id": dag_id, "run_id": dr.run_id, "state": str(dr.state),
                "wall_s": (ended - started).total_seconds() if started and ended else None,
                "bootstrapped": profiles.get("bootstrapped", []), "tasks": tasks}


def over_budget(run: dict, budget) -> list[str]:
    """Why `run` (airflow_run) broke `budget` (config BudgetConfig); empty when it kept it. A run that bootstrapped
    no champion is a rerun and has the rerun budget."""
    problems = []
    if not run["state"].endswith("success"):
        problems.append(f"the run ended {run['state']}, not success: a failed run proves nothing about its budget")
    limit = budget.wall_minutes if run["bootstrapped"] else budget.rerun_wall_minutes
    kind = "first run (champions bootstrapped)" if run["bootstrapped"] else "rerun (champions registered)"
    if run["wall_s"] is None:
        problems.append("the run has no end time")
    elif run["wall_s"] > 60 * limit:
        slow = sorted(run["tasks"], key=lambda t: -t["wall_s"])[:3]
        problems.append(f"wall time {run['wall_s'] / 60:.1f} min is over the {kind} budget of {limit:g} min; longest "
                        f"tasks: " + ", ".join(f"{t['task']} {t['wall_s'] / 60:.1f} min" for t in slow))
    if not any(t["tree_peak_rss_mb"] is not None for t in run["tasks"]):
        problems.append("no task of the run recorded its memory (a run from before task profiles): rerun it")
    peak = max((t["tree_peak_rss_mb"] or 0.0 for t in run["tasks"]), default=0.0)
    if peak > 1024 * budget.peak_memory_gb:
        worst = max(run["tasks"], key=lambda t: t["tree_peak_rss_mb"] or 0.0)
        problems.append(f"peak memory {peak / 1024:.2f} GB (during {worst['task']}) is over the budget of "
                        f"{budget.peak_memory_gb:g} GB")
    return problems
