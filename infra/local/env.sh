# shellcheck shell=bash
# Embedded (one-machine) defaults for instantrec, Airflow and MLflow.
#
#   source infra/local/env.sh        # from the repository root, or from anywhere:
#   source /path/to/repo/infra/local/env.sh
#
# Every path is absolute and derived from this file's location, so the result does not depend
# on the directory you source it from. A variable that is already set in your environment keeps
# its value: override any default by setting it first, e.g.
#
#   INSTANTREC_HOME=/data/instantrec source infra/local/env.sh
#
# Needs bash (it reads ${BASH_SOURCE[0]}). Sourcing it twice is harmless.

if [ -z "${BASH_SOURCE[0]:-}" ]; then
    echo "infra/local/env.sh: source this file from bash" >&2
    return 1 2>/dev/null || exit 1
fi
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "infra/local/env.sh: source this file (source ${BASH_SOURCE[0]}), do not execute it" >&2
    exit 1
fi

_instantrec_repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)"

# --- instantrec (serving/settings.py, prefix INSTANTREC_) -----------------------------------
# Artefact root: warehouse.duckdb, releases/ (bundles + CURRENT pointer), work/, cache/, and
# mlflow/mlflow.db + mlflow/artifacts/ (the embedded MLflow registry).
export INSTANTREC_HOME="${INSTANTREC_HOME:-$_instantrec_repo/artefacts}"
case "$INSTANTREC_HOME" in
    /*) ;;
    *) INSTANTREC_HOME="$PWD/$INSTANTREC_HOME" ;;  # settings would resolve it against each process's cwd
esac
# INSTANTREC_MLFLOW_TRACKING_URI is deliberately left unset: the settings then use
# sqlite:///$INSTANTREC_HOME/mlflow/mlflow.db with artefacts in $INSTANTREC_HOME/mlflow/artifacts.
# Set it (e.g. to http://127.0.0.1:5000 while mlflow/server.sh runs) to go through a server.

# The encoder ships inside a Python package: never reach for a model hub at run time.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
# Tokenizer threads inside forked Airflow task processes only contend with torch's.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# --- MLflow --------------------------------------------------------------------------------
# The same store for the `mlflow` CLI (`mlflow ui`, `mlflow run`, `mlflow models ...`) and for
# mlflow.pyfunc.load_model("models:/instantrec@champion") as the pipeline writes to.
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-${INSTANTREC_MLFLOW_TRACKING_URI:-sqlite:///$INSTANTREC_HOME/mlflow/mlflow.db}}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# Against a tracking server MLflow prints "View run ... at: URL" lines on stdout, where the
# instantrec CLI writes its JSON results.
export MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="${MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT:-true}"

# --- Airflow 3.3 (LocalExecutor, SQLite metadata in $AIRFLOW_HOME/airflow.db) ---------------
# Run it with infra/local/airflow.sh start|status|stop (every socket on loopback).
export AIRFLOW_HOME="${AIRFLOW_HOME:-$_instantrec_repo/.airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$_instantrec_repo/dags}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__CORE__EXECUTOR="${AIRFLOW__CORE__EXECUTOR:-LocalExecutor}"
# The LocalExecutor otherwise starts [core] parallelism (32) worker processes up front.
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
# UI + REST API + execution API (api-server). Loopback only: the embedded set-up uses the
# SimpleAuthManager, which is for development.
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"
export AIRFLOW__API__PORT="${AIRFLOW__API__PORT:-8080}"
# Task processes report to the execution API. Airflow's default URL is always
# http://localhost:8080/execution/ whatever [api] port says, so follow the port explicitly.
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW__API__PORT/execution/}"

# Log servers: `airflow scheduler` and `airflow triggerer` start one (`airflow serve-logs`, ports
# [logging] worker_log_server_port 8793 / trigger_log_server_port 8794) and Airflow 3.3 binds it
# on every interface, with no setting for the host. The embedded set-up does not need it (the
# LocalExecutor's task logs are files under $AIRFLOW_HOME/logs, which the api-server reads), so
# infra/local/airflow.sh (`make airflow-start`) runs them with --skip-serve-logs. `airflow
# standalone` cannot skip it: it listens on 0.0.0.0/:: port 8793 and 8794.
# The scheduler's health-check server stays off; were it enabled, it would bind loopback.
export AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="${AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK:-False}"
export AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST="${AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST:-127.0.0.1}"

unset _instantrec_repo
