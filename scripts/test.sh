#!/usr/bin/env bash
# The test suite: unit tests, DAG integrity, bad-input tests, an end-to-end dag.test() run on tiny
# random-initialised models, and the integration tests against real PostgreSQL, S3 (moto's server) and MLflow
# server processes. Extra arguments go to pytest.
. "$(dirname "$0")/_env.sh"
# Server binaries from Debian's packages, installed once: PostgreSQL for tests/test_production_stack.py and
# tests/test_engine.py, Redis (the Celery broker) for tests/test_engine.py.
MISSING=""
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  MISSING="postgresql"
fi
command -v redis-server >/dev/null 2>&1 || MISSING="$MISSING redis-server"
if [ -n "$MISSING" ]; then
  echo "==> installing$MISSING (Debian packages) for the integration tests"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # shellcheck disable=SC2086
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $MISSING >/dev/null
fi
# Docker Compose v2 (a CLI plugin in the venv) for the compose-file test; no engine is needed for `config`.
"$ROOT/scripts/install_compose.sh" "$VENV"
python -m ruff check qat_tasks dags plugins tests bench
exec python -m pytest "$@"
