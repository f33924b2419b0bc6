# Shared set-up for scripts/demo.sh and scripts/test.sh: a venv with the pinned stack, installed once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${QAT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.qat-installed"
WANT="$(cat requirements.txt requirements-dev.txt constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "==> installing pinned dependencies (torch 2.13.0 CPU held by constraints.txt)"
  python -m pip install -q --upgrade pip
  # torch first and alone, so nothing later can pull a newer (CUDA) build.
  python -m pip install -q "torch==2.13.0"
  # the runtime pins and the test tools (requirements-dev.txt includes requirements.txt)
  python -m pip install -q -r requirements-dev.txt -c constraints.txt
  python -m pip install -q --no-deps -e .
  python -m pip check
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false
export AIRFLOW__CORE__LOAD_EXAMPLES=False AIRFLOW__CORE__DAGS_FOLDER="$ROOT/dags" AIRFLOW__CORE__PLUGINS_FOLDER="$ROOT/plugins"
