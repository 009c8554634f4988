#!/usr/bin/env bash
# MLflow tracking server + model registry over the embedded store that the pipeline writes:
#
#   backend    sqlite:///$INSTANTREC_HOME/mlflow/mlflow.db
#   artefacts  $INSTANTREC_HOME/mlflow/artifacts   (proxied: clients upload/download over HTTP)
#   address    http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}
#
# Usage:  mlflow/server.sh [extra `mlflow server` options, e.g. --workers 2]
#
# Defaults come from infra/local/env.sh (INSTANTREC_HOME=<repo>/artefacts unless already set).
# Environment: MLFLOW_PORT (5000), MLFLOW_HOST (127.0.0.1), MLFLOW_WORKERS (1),
# MLFLOW_BIN (the mlflow executable; default <repo>/.venv/bin/mlflow, else mlflow on PATH).
#
# The pipeline may keep writing to the same SQLite file directly while this runs
# (INSTANTREC_MLFLOW_TRACKING_URI unset), or go through the server with
# INSTANTREC_MLFLOW_TRACKING_URI=http://127.0.0.1:5000.
set -euo pipefail

mlflow_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
repo="$(dirname -- "$mlflow_dir")"
# shellcheck source=../infra/local/env.sh
source "$repo/infra/local/env.sh"

port="${MLFLOW_PORT:-5000}"
host="${MLFLOW_HOST:-127.0.0.1}"
workers="${MLFLOW_WORKERS:-1}"  # SQLite has one writer; more workers only add memory
backend="sqlite:///$INSTANTREC_HOME/mlflow/mlflow.db"
artifacts="$INSTANTREC_HOME/mlflow/artifacts"

mlflow_bin="${MLFLOW_BIN:-}"
if [ -z "$mlflow_bin" ]; then
    if [ -x "$repo/.venv/bin/mlflow" ]; then
        mlflow_bin="$repo/.venv/bin/mlflow"
    elif ! mlflow_bin="$(command -v mlflow)"; then
        echo "mlflow/server.sh: no mlflow executable; install the project with" \
             "pip install -e '.[pipelines]' or set MLFLOW_BIN" >&2
        exit 1
    fi
fi

mkdir -p "$artifacts"
echo "MLflow server: backend $backend, artefacts $artifacts, http://$host:$port" >&2
exec "$mlflow_bin" server \
    --backend-store-uri "$backend" \
    --artifacts-destination "$artifacts" \
    --host "$host" \
    --port "$port" \
    --workers "$workers" \
    "$@"
