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
# each component's output go to $AIRFLOW_HOME/run/. Needs bash and setsid (util-linux).

set -euo pipefail

_here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
# shellcheck source=env.sh
source "$_here/env.sh"
_repo="$(cd -- "$_here/../.." && pwd -P)"
AIRFLOW_BIN="${AIRFLOW_BIN:-$_repo/.venv/bin/airflow}"
RUN_DIR="$AIRFLOW_HOME/run"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"

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

pid_of() {  # the recorded PID if that process is alive, else nothing
    local file="$RUN_DIR/$1.pid" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

start() {
    mkdir -p "$RUN_DIR"
    "$AIRFLOW_BIN" db migrate >"$RUN_DIR/db-migrate.log" 2>&1 \
        || { tail -30 "$RUN_DIR/db-migrate.log" >&2; exit 1; }
    local name pid
    # shellcheck disable=SC2046
    for name in $(components); do
        pid="$(pid_of "$name")"
        if [ -n "$pid" ]; then
            echo "$name already running (PID $pid)"
            continue
        fi
        # setsid: each component leads its own process group, so stop reaches its children
        # (the LocalExecutor's workers, uvicorn's, the DAG parsing processes) through one PID.
        # shellcheck disable=SC2046
        setsid "$AIRFLOW_BIN" $(command_of "$name") >"$RUN_DIR/$name.log" 2>&1 </dev/null &
        echo $! >"$RUN_DIR/$name.pid"
        echo "$name started (PID $!, output $RUN_DIR/$name.log)"
    done
    local url="http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT" deadline=$((SECONDS + START_TIMEOUT_S))
    until curl -fsS "$url/api/v2/monitor/health" >/dev/null 2>&1; do
        if [ -z "$(pid_of api-server)" ]; then
            echo "api-server exited; its output:" >&2
            tail -30 "$RUN_DIR/api-server.log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "api-server did not answer on $url within ${START_TIMEOUT_S} s" >&2
            exit 1
        fi
        sleep 1
    done
    echo "UI and REST API: $url (user admin, password in" \
        "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
}

stop() {
    local name pid deadline
    for name in triggerer dag-processor scheduler api-server; do
        pid="$(pid_of "$name")"
        if [ -z "$pid" ]; then
            rm -f "$RUN_DIR/$name.pid"
            continue
        fi
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_TIMEOUT_S))
        while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$name (PID $pid) ignored SIGTERM for ${STOP_TIMEOUT_S} s: SIGKILL" >&2
        fi
        # SIGKILL the group either way: children the leader left behind go too
        kill -KILL -- "-$pid" 2>/dev/null || true
        rm -f "$RUN_DIR/$name.pid"
        echo "$name stopped (PID $pid)"
    done
}

status() {
    local name pid pids=""
    # shellcheck disable=SC2046
    for name in $(components); do
        pid="$(pid_of "$name")"
        if [ -n "$pid" ]; then
            echo "$name: running (PID $pid)"
            pids="$pids $(pgrep -g "$pid" | tr '\n' ' ')"
        else
            echo "$name: not running"
        fi
    done
    if [ -n "${pids// /}" ] && command -v ss >/dev/null 2>&1; then
        echo "listening sockets:"
        local p
        for p in $pids; do ss -Hltnp 2>/dev/null | grep "pid=$p," || true; done | sort -u
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
