#!/usr/bin/env bash
# Drift-triggered recalibration on the embedded default, after scripts/demo.sh has registered the champions:
#   1. live traffic = the bundled Q3 sample plus a week of a new-catalogue launch (generated, catalogue_launch);
#   2. `airflow dags test drift_monitor` checks the last day against each champion's calibration-time statistics
#      and, past the threshold, triggers quarterly_recalibration (a queued run, with reason, models and window);
#   3. RUN_TRIGGERED=1 also runs that recalibration with the conf the monitor gave it.
. "$(dirname "$0")/_env.sh"
export PYTHONUNBUFFERED=1
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/.state/airflow}"
DEMO="$ROOT/.state/drift-demo"
DAY="${DAY:-2026-10-08}"   # the monitor's logical date: it checks the day before
mkdir -p "$DEMO/traffic"
python - "$DEMO" <<'PY'
import sys
from pathlib import Path
import yaml
from qat_tasks.core.config import DEFAULT_CONFIG, PROJECT_ROOT
demo = Path(sys.argv[1])
data = yaml.safe_load(DEFAULT_CONFIG.read_text())
data["traffic"]["source"] = str(demo / "traffic")   # one place: what the service logs is what calibration reads
data.setdefault("serving", {})["log_dir"] = None
(demo / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
for part in sorted((PROJECT_ROOT / "data" / "traffic_sample").glob("dt=*")):
    link = demo / "traffic" / part.name
    if not link.exists():
        link.symlink_to(part, target_is_directory=True)
PY
export QAT_CONFIG="$DEMO/config.yaml"
if [ ! -d "$DEMO/traffic/dt=2026-10-01" ]; then
  echo "==> a new catalogue launches on 2026-10-01: a week of its traffic"
  qat-tasks generate-traffic --out "$DEMO/traffic" --start 2026-10-01 --end 2026-10-08 --per-day 300 --seed 41 \
    --drift catalogue_launch >/dev/null
fi
airflow db migrate >/dev/null
echo "==> airflow dags test drift_monitor $DAY"
airflow dags test drift_monitor "$DAY" 2>&1 | tee "$ROOT/.state/drift-monitor.log" | grep -E "\[qat_tasks|ERROR|Traceback" \
  | sed -E 's/^[0-9T:.-]+Z //; s/ loc=.*$//' || true
CONF=$(python - <<'PY'
import json
from airflow.models.dagrun import DagRun
from airflow.utils.session import create_session
from sqlalchemy import select
with create_session() as s:
    dr = s.scalars(select(DagRun).where(DagRun.dag_id == "quarterly_recalibration", DagRun.run_id.like("drift__%"))
                   .order_by(DagRun.id.desc())).first()
    print(json.dumps(dr.conf) if dr is not None else "")
PY
)
if [ -z "$CONF" ]; then
  echo "==> no recalibration was triggered (no drift past the threshold)"; exit 0
fi
echo "==> drift_monitor triggered quarterly_recalibration with conf: $CONF"
if [ "${RUN_TRIGGERED:-0}" = "1" ]; then
  echo "==> airflow dags test quarterly_recalibration $DAY (the triggered conf)"
  airflow dags test quarterly_recalibration "$DAY" --conf "$CONF" 2>&1 | tee "$ROOT/.state/drift-recalibration.log" \
    | grep -E "\[qat_tasks|ERROR|Traceback" | sed -E 's/^[0-9T:.-]+Z //; s/ loc=.*$//' || true
fi
