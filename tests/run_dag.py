"""Run one DAG run in this process with Airflow's own dag.test(), under a run id fixed by its logical date.

    python -m tests.run_dag quarterly_recalibration 2026-07-16 '{"reason": "..."}'

`airflow dags test` names each run after the wall clock, so running it again makes a new DAG run. In
production the same DAG run is rerun by clearing its tasks, which keeps its run id; this driver does the same
by running the DAG at run_after = logical date (run id `manual__<date>`): Airflow replaces the earlier run of
that date and the pipeline's stages find their work by that id. Prints `state=<state> run_id=<id>` last.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime


def main(argv: list[str]) -> int:
    dag_id, day, conf = argv[0], argv[1], json.loads(argv[2]) if len(argv) > 2 else {}
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).dags[dag_id]
    when = datetime.fromisoformat(day).replace(tzinfo=UTC)
    dr = dag.test(run_after=when, logical_date=when, run_conf=conf)
    print(f"state={dr.state} run_id={dr.run_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
