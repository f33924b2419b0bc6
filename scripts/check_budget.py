#!/usr/bin/env python
"""Fail when the main job's last run went over its budget: wall time and peak memory (config section `budget`).

    .venv/bin/python scripts/check_budget.py                   # the last quarterly_recalibration run, $QAT_CONFIG
    .venv/bin/python scripts/check_budget.py --run-id manual__2026-10-01T00:00:00+00:00 --config configs/full.yaml

It reads what the run recorded, never times anything itself: Airflow's task durations and the DAG run's start
and end from the metadata database ($AIRFLOW_HOME, as scripts/demo.sh sets it: .state/airflow), and the peak
memory each task's result carries. Prints the task table; exits 1 with the reasons when over budget.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dag-id", default="quarterly_recalibration")
    ap.add_argument("--run-id", default=None, help="default: the newest run of the DAG")
    ap.add_argument("--config", default=os.environ.get("QAT_CONFIG", str(ROOT / "configs" / "demo.yaml")))
    args = ap.parse_args(argv)
    os.environ.setdefault("AIRFLOW_HOME", str(ROOT / ".state" / "airflow"))

    from qat_tasks.core.config import load_config
    from qat_tasks.reporting import task_profile

    cfg = load_config(args.config)
    try:
        run = task_profile.airflow_run(args.dag_id, args.run_id)
    except LookupError as exc:
        print(f"check_budget: {exc}", file=sys.stderr)
        return 2
    print(f"{run['dag_id']} {run['run_id']}: {run['state']}, "
          + (f"{run['wall_s'] / 60:.1f} min" if run["wall_s"] is not None else "no end time")
          + (f", champions bootstrapped: {', '.join(run['bootstrapped'])}" if run["bootstrapped"] else ", a rerun"))
    for line in task_profile.rows_text(run["tasks"]):
        print("  " + line)
    problems = task_profile.over_budget(run, cfg.budget)
    b = cfg.budget
    print(f"budget ({cfg.profile}): {b.wall_minutes:g} min first run, {b.rerun_wall_minutes:g} min rerun, "
          f"{b.peak_memory_gb:g} GB peak")
    for p in problems:
        print(f"OVER BUDGET: {p}")
    if not problems:
        print("within budget")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
