#!/usr/bin/env bash
# The embedded Airflow as separate processes, every listening socket on loopback:
#
#   infra/local/airflow.sh start     # api-server, scheduler, dag-processor (background)
#   infra/local/airflow.sh status    # PIDs and the sockets they listen on
#   infra/local/airflow.sh stop      # stops them by PID (SIGTERM, then SIGKILL after 30 s)
#
# Why not `airflow standalone`: it starts the scheduler and the triggerer with their log servers
# (`airflow serve-logs`, [logging] worker_log_server_port 8793 and trigger_log_server_port 8794),
# and Airflow 3.3 binds those on every interface (host "" in airflow/utils/serve_logs/core.py;
# no setting changes the host). Here the scheduler runs with --skip-serve-logs: with the
# LocalExecutor the task processes write their logs under $AIRFLOW_HOME/logs on this machine,
# and the api-server reads them from there. The api-server binds $AIRFLOW__API__HOST
# (127.0.0.1 in env.sh). No triggerer: no task here is deferrable (AIRFLOW_TRIGGERER=1 starts
# one, also with --skip-serve-logs).
#
# Settings come from infra/local/env.sh (a variable already set keeps its value). PID files and
# each component's output go to $AIRFLOW_HOME/run/; the process helpers (launch, stop_one, ...)
# are infra/lib/procs.sh, shared with infra/scaled/loopback.sh. Needs bash, setsid (util-linux)
# and curl.

set -euo pipefail

_here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=env.sh
source "$_here/env.sh"
_repo="$(cd -- "$_here/../.." && pwd -P)"
AIRFLOW_BIN="${AIRFLOW_BIN:-$_repo/.venv/bin/airflow}"
RUN_DIR="$AIRFLOW_HOME/run"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"
# pid_of, launch, wait_until, stop_one, report
# shellcheck source=../lib/procs.sh
source "$_here/../lib/procs.sh"

components() {
    echo "api-server scheduler dag-processor"
    if [ "${AIRFLOW_TRIGGERER:-0}" = "1" ]; then echo "triggerer"; fi
}

command_of() {
    case "$1" in
        api-server) echo "api-server" ;;
        scheduler) echo "scheduler --skip-serve-logs" ;;
        dag-processor) echo "dag-processor" ;;
        triggerer) echo "triggerer --skip-serve-logs" ;;
    esac
}

start() {
    mkdir -p "$RUN_DIR"
    "$AIRFLOW_BIN" db migrate >"$RUN_DIR/db-migrate.log" 2>&1 \
        || { tail -30 "$RUN_DIR/db-migrate.log" >&2; exit 1; }
    local name
    for name in $(components); do
        # shellcheck disable=SC2046
        launch "$name" "$AIRFLOW_BIN" $(command_of "$name")
    done
    local url="http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT"
    wait_until api-server "answer on $url" curl -fsS "$url/api/v2/monitor/health"
    echo "UI and REST API: $url (user admin, password in" \
        "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
}

stop() {
    local name
    for name in triggerer dag-processor scheduler api-server; do stop_one "$name"; done
}

# shellcheck disable=SC2046
status() { report $(components); }

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
