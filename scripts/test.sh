#!/usr/bin/env bash
# The test suite: unit tests, DAG integrity, bad-input tests and an end-to-end dag.test() run
# on tiny random-initialised models. Extra arguments go to pytest.
. "$(dirname "$0")/_env.sh"
python -m ruff check qat_tasks dags plugins tests bench
exec python -m pytest "$@"
