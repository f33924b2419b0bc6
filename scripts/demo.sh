#!/usr/bin/env bash
# The main job: the quarterly recalibration DAG, end to end, on the embedded default
# (SQLite Airflow metadata, SQLite MLflow store under .state/, bundled models and traffic sample).
#   scripts/demo.sh                       # Q3 2026 window of the bundled sample
#   REASON="..." scripts/demo.sh          # with your own reason
#   MODELS="fallback-llm" scripts/demo.sh # only these models (comma-separated names from the config)
#   PROFILE=full scripts/demo.sh          # configs/full.yaml: the larger sizes (about an hour on 2 cores)
. "$(dirname "$0")/_env.sh"
export QAT_CONFIG="${QAT_CONFIG:-$ROOT/configs/${PROFILE:-demo}.yaml}"
export PYTHONUNBUFFERED=1   # watch the run live through the console filter
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.state/airflow}"
mkdir -p "$AIRFLOW_HOME"
LOGICAL_DATE="${LOGICAL_DATE:-2026-10-01}"   # the scheduled run that covers 2026-07-01 .. 2026-10-01
REASON="${REASON:-demo: quarterly recalibration on the bundled traffic sample}"

echo "==> airflow db migrate ($AIRFLOW_HOME/airflow.db)"
airflow db migrate >/dev/null
# Remember the newest DAG run, so the verdict below can only come from the run this command creates (a run for
# the same logical date replaces the earlier one, and SQLite may give it the same id: the run id tells them apart).
LAST=$(python - <<'PY'
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select
with create_session() as s:
    dr = s.scalars(select(DagRun).where(DagRun.dag_id == "quarterly_recalibration").order_by(DagRun.id.desc())).first()
    print(dr.run_id if dr else "")
PY
)
echo "==> airflow dags test quarterly_recalibration $LOGICAL_DATE"
CONF=$(python -c 'import json,sys; print(json.dumps({"reason": sys.argv[1],
    "models": [m for m in sys.argv[2].split(",") if m]}))' "$REASON" "${MODELS:-}")
# The console shows the pipeline's own messages (and any error); Airflow's full log goes to the file.
airflow dags test quarterly_recalibration "$LOGICAL_DATE" --conf "$CONF" 2>&1 | tee "$ROOT/.state/demo-run.log" \
  | awk '/\[qat_tasks|\[error|ERROR|Traceback/ {p=1} /^20[0-9][0-9]-/ && !/\[qat_tasks|\[error|ERROR/ {p=0}
         p { sub(/^20[0-9-]+T/, ""); sub(/\.[0-9]+Z \[/, " ["); sub(/ \[qat_tasks[^]]*\] loc=.*$/, ""); print; fflush() }' || true
python - "$LAST" <<'PY'
import os, sys
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select
from qat_tasks.core.config import load_config
from qat_tasks.reporting import task_profile
with create_session() as s:
    dr = s.scalars(select(DagRun).where(DagRun.dag_id == "quarterly_recalibration").order_by(DagRun.id.desc())).first()
    if dr is None or dr.run_id == sys.argv[1]:
        sys.exit("==> no DAG run was created: see .state/demo-run.log (DAG import error? bad --conf?)")
run = task_profile.airflow_run("quarterly_recalibration", dr.run_id)
wall = f"{run['wall_s'] / 60:.1f} min" if run["wall_s"] is not None else "no end time"
print(f"==> DAG run {run['run_id']}: {run['state']} in {wall}")
for line, t in zip(task_profile.rows_text(run["tasks"]), [None, *run["tasks"]]):
    print(f"    {line}" + ("" if t is None else f"  {t['state'].split('.')[-1]}"))
problems = task_profile.over_budget(run, load_config(os.environ["QAT_CONFIG"]).budget)
print("==> budget: " + ("kept" if not problems else "; ".join(problems)))
sys.exit(0 if run["state"].endswith("success") else 1)
PY
echo "==> look at it:  .venv/bin/mlflow ui --backend-store-uri sqlite:///$ROOT/.state/mlflow/mlflow.db --port 5000"
echo "    full log: .state/demo-run.log"
