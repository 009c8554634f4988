#!/usr/bin/env bash
# The scaled-out set-up on one machine, every listening socket on 127.0.0.1: Postgres (Airflow's
# metadata DB and MLflow's backend store), Redis (the Celery broker), the MLflow tracking server,
# and Airflow with the CeleryExecutor: api-server, scheduler, dag-processor and Celery workers.
#
#   infra/scaled/loopback.sh start           # everything, in the background
#   infra/scaled/loopback.sh status          # PIDs, URLs and the sockets they listen on
#   infra/scaled/loopback.sh stop            # by PID: SIGTERM, SIGKILL after 30 s
#   eval "$(infra/scaled/loopback.sh env)"   # the same settings for the airflow/mlflow CLIs
#
# Everything lives under $INSTANTREC_LOOPBACK_DIR (default <repo>/.airflow/loopback):
#   airflow/           AIRFLOW_HOME: task logs, simple_auth_manager_passwords.json.generated
#   home/              INSTANTREC_HOME (unless INSTANTREC_HOME is set): warehouse, releases
#   mlflow-artifacts/  the MLflow server's --artifacts-destination
#   run/               PID files, each component's output, settings.env (ports and secrets,
#                      generated at the first start, mode 0600), postgres/ (the private
#                      cluster: data/, socket/), redis/
#
# Ports are free loopback ports picked at the first start and kept in run/settings.env; set
# AIRFLOW_PORT, POSTGRES_PORT, REDIS_PORT or MLFLOW_PORT to choose one. CELERY_WORKERS (2)
# workers are started, each with CELERY_CONCURRENCY (1) task slots: an embedding shard keeps
# every core busy. Other AIRFLOW__* variables in the caller's environment reach every component.
#
# Postgres refuses to run as root: run as root, the script runs initdb, psql and the server as
# the `postgres` OS user, which then needs to reach run/postgres (every directory above it
# searchable by others; mktemp's and pytest's 0700 directories are not).
#
# Workers run with --skip-serve-logs: the log server would listen on every interface (Airflow
# 3.3 binds host ""), and on one machine the api-server reads task logs from
# $AIRFLOW_HOME/logs. Each worker gets CELERY_WORKER_HOSTNAME = its --celery-hostname, which
# infra/scaled/worker_hostname.py hands to Airflow as [core] hostname_callable, so a task
# instance's `hostname` names the worker that ran it.
#
# Needs bash, setsid and setpriv (util-linux), curl, redis-server and redis-cli, PostgreSQL's
# server binaries (Debian: postgresql, /usr/lib/postgresql/<version>/bin; or PG_BIN), and the
# project installed with its `scaled` extra (VENV_BIN, default <repo>/.venv/bin).

set -euo pipefail

_here="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
_repo="$(cd -- "$_here/../.." && pwd -P)"
LOOPBACK_DIR="${INSTANTREC_LOOPBACK_DIR:-$_repo/.airflow/loopback}"
case "$LOOPBACK_DIR" in /*) ;; *) LOOPBACK_DIR="$PWD/$LOOPBACK_DIR" ;; esac
VENV_BIN="${VENV_BIN:-$_repo/.venv/bin}"
RUN_DIR="$LOOPBACK_DIR/run"
SETTINGS="$RUN_DIR/settings.env"
PG_DIR="$RUN_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_SOCKET_DIR="$PG_DIR/socket"
REDIS_DIR="$RUN_DIR/redis"
CELERY_WORKERS="${CELERY_WORKERS:-2}"
CELERY_CONCURRENCY="${CELERY_CONCURRENCY:-1}"
START_TIMEOUT_S="${START_TIMEOUT_S:-120}"
STOP_TIMEOUT_S="${STOP_TIMEOUT_S:-30}"
HOST="127.0.0.1"
AS_ROOT=0
if [ "$(id -u)" -eq 0 ]; then AS_ROOT=1; fi
# pid_of, launch, wait_until, stop_one, report (needs RUN_DIR, START_TIMEOUT_S, STOP_TIMEOUT_S)
# shellcheck source=../lib/procs.sh
source "$_here/../lib/procs.sh"

# --- settings --------------------------------------------------------------------------------

free_ports() {  # N distinct free loopback ports (all held open until every one is chosen)
    "$VENV_BIN/python" - "$1" <<'PY'
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}

secret() { "$VENV_BIN/python" -c 'import secrets; print(secrets.token_hex(24))'; }

# Variables every component gets; `env` prints them for the CLIs.
EXPORTED=()
put() {  # put NAME VALUE: export it and remember it for `env`
    export "$1=$2"
    EXPORTED+=("$1")
}

configure() {
    mkdir -p "$RUN_DIR"
    local LB_AIRFLOW_PORT="" LB_POSTGRES_PORT="" LB_REDIS_PORT="" LB_MLFLOW_PORT="" \
        LB_AIRFLOW_DB_PASSWORD="" LB_MLFLOW_DB_PASSWORD="" LB_REDIS_PASSWORD="" \
        LB_JWT_SECRET="" LB_API_SECRET_KEY="" LB_FERNET_KEY=""
    # shellcheck disable=SC1090
    if [ -f "$SETTINGS" ]; then source "$SETTINGS"; fi
    local ports
    read -r -a ports <<<"$(free_ports 4)"
    AIRFLOW_PORT="${AIRFLOW_PORT:-${LB_AIRFLOW_PORT:-${ports[0]}}}"
    POSTGRES_PORT="${POSTGRES_PORT:-${LB_POSTGRES_PORT:-${ports[1]}}}"
    REDIS_PORT="${REDIS_PORT:-${LB_REDIS_PORT:-${ports[2]}}}"
    MLFLOW_PORT="${MLFLOW_PORT:-${LB_MLFLOW_PORT:-${ports[3]}}}"
    AIRFLOW_DB_PASSWORD="${LB_AIRFLOW_DB_PASSWORD:-$(secret)}"
    MLFLOW_DB_PASSWORD="${LB_MLFLOW_DB_PASSWORD:-$(secret)}"
    REDIS_PASSWORD="${LB_REDIS_PASSWORD:-$(secret)}"
    local jwt_secret="${LB_JWT_SECRET:-$(secret)}" api_secret="${LB_API_SECRET_KEY:-$(secret)}"
    local fernet="${LB_FERNET_KEY:-$("$VENV_BIN/python" -c \
        'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')}"
    (
        umask 077
        {
            echo "# Generated by infra/scaled/loopback.sh at the first start; kept across restarts."
            printf 'LB_%s=%q\n' AIRFLOW_PORT "$AIRFLOW_PORT" POSTGRES_PORT "$POSTGRES_PORT" \
                REDIS_PORT "$REDIS_PORT" MLFLOW_PORT "$MLFLOW_PORT" \
                AIRFLOW_DB_PASSWORD "$AIRFLOW_DB_PASSWORD" \
                MLFLOW_DB_PASSWORD "$MLFLOW_DB_PASSWORD" REDIS_PASSWORD "$REDIS_PASSWORD" \
                JWT_SECRET "$jwt_secret" API_SECRET_KEY "$api_secret" FERNET_KEY "$fernet"
        } >"$SETTINGS.tmp"
        mv -f "$SETTINGS.tmp" "$SETTINGS"
    )

    local pg="$HOST:$POSTGRES_PORT"
    AIRFLOW_API="http://$HOST:$AIRFLOW_PORT"
    MLFLOW_URL="http://$HOST:$MLFLOW_PORT"
    MLFLOW_BACKEND="postgresql+psycopg2://mlflow:$MLFLOW_DB_PASSWORD@$pg/mlflow"
    MLFLOW_ARTIFACTS="$LOOPBACK_DIR/mlflow-artifacts"

    # Airflow, the same in every component
    put AIRFLOW_HOME "$LOOPBACK_DIR/airflow"
    put AIRFLOW__CORE__DAGS_FOLDER "$_repo/dags"
    put AIRFLOW__CORE__LOAD_EXAMPLES False
    put AIRFLOW__CORE__EXECUTOR CeleryExecutor
    put AIRFLOW__CORE__PARALLELISM "${AIRFLOW__CORE__PARALLELISM:-8}"
    put AIRFLOW__DATABASE__SQL_ALCHEMY_CONN "postgresql+psycopg2://airflow:$AIRFLOW_DB_PASSWORD@$pg/airflow"
    put AIRFLOW__CELERY__BROKER_URL "redis://:$REDIS_PASSWORD@$HOST:$REDIS_PORT/0"
    put AIRFLOW__CELERY__RESULT_BACKEND "db+postgresql+psycopg2://airflow:$AIRFLOW_DB_PASSWORD@$pg/airflow"
    put AIRFLOW__CELERY__WORKER_CONCURRENCY "$CELERY_CONCURRENCY"
    # One value in every component: the scheduler signs the tokens task processes present to
    # the api-server's execution API.
    put AIRFLOW__API_AUTH__JWT_SECRET "$jwt_secret"
    put AIRFLOW__API__SECRET_KEY "$api_secret"
    put AIRFLOW__CORE__FERNET_KEY "$fernet"
    put AIRFLOW__API__HOST "$HOST"
    put AIRFLOW__API__PORT "$AIRFLOW_PORT"
    # Airflow's default is http://localhost:8080/execution/ whatever [api] port says.
    put AIRFLOW__CORE__EXECUTION_API_SERVER_URL "$AIRFLOW_API/execution/"
    put AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK False
    put AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST "$HOST"
    put AIRFLOW__CORE__HOSTNAME_CALLABLE worker_hostname.worker_hostname
    put PYTHONPATH "$_here${PYTHONPATH:+:$PYTHONPATH}"
    # instantrec and MLflow clients (the register task, the mlflow CLI)
    put INSTANTREC_HOME "${INSTANTREC_HOME:-$LOOPBACK_DIR/home}"
    put INSTANTREC_MLFLOW_TRACKING_URI "$MLFLOW_URL"
    put MLFLOW_TRACKING_URI "$MLFLOW_URL"
    put MLFLOW_DISABLE_TELEMETRY true
    put MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT true
    put HF_HUB_OFFLINE 1
    put TOKENIZERS_PARALLELISM false
}

# --- processes -------------------------------------------------------------------------------

pg_bin() {
    if [ -z "${PG_BIN:-}" ]; then
        PG_BIN="$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -1)"
    fi
    if [ ! -x "${PG_BIN:-}/postgres" ] || [ ! -x "$PG_BIN/initdb" ]; then
        echo "no PostgreSQL server binaries (postgres, initdb) in ${PG_BIN:-/usr/lib/postgresql/*/bin}:" \
            "install Debian's postgresql (make system-deps) or set PG_BIN" >&2
        exit 1
    fi
}

as_pg() {  # a one-shot command as the cluster's owner, from a directory it can read
    if [ "$AS_ROOT" = 1 ]; then
        (cd "$PG_DIR" && runuser -u postgres -- "$@")
    else
        (cd "$PG_DIR" && "$@")
    fi
}

pg_sql() {  # SQL on stdin (passwords stay off command lines), as the superuser, over the socket
    as_pg "$PG_BIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$PG_SOCKET_DIR" -p "$POSTGRES_PORT" \
        -d postgres
}

pg_ready() { as_pg "$PG_BIN/pg_isready" -q -h "$PG_SOCKET_DIR" -p "$POSTGRES_PORT"; }

ensure_database() {  # ensure_database NAME PASSWORD: a login role NAME owning database NAME
    local name="$1" password="$2"
    if [ -z "$(echo "SELECT 1 FROM pg_roles WHERE rolname = '$name'" | pg_sql)" ]; then
        echo "CREATE ROLE $name LOGIN PASSWORD '$password'" | pg_sql
    else  # settings.env may have been regenerated: the role takes the current password
        echo "ALTER ROLE $name PASSWORD '$password'" | pg_sql
    fi
    if [ -z "$(echo "SELECT 1 FROM pg_database WHERE datname = '$name'" | pg_sql)" ]; then
        echo "CREATE DATABASE $name OWNER $name" | pg_sql
    fi
}

start_postgres() {
    pg_bin
    mkdir -p "$PG_DIR"
    if [ "${#PG_SOCKET_DIR}" -gt 90 ]; then  # a Unix socket path has at most 107 bytes
        echo "$PG_SOCKET_DIR is too long for a Unix socket path: use a shorter" \
            "INSTANTREC_LOOPBACK_DIR" >&2
        exit 1
    fi
    if [ "$AS_ROOT" = 1 ]; then
        chown postgres:postgres "$PG_DIR"
        chmod 700 "$PG_DIR"
        if ! runuser -u postgres -- test -w "$PG_DIR"; then
            echo "the postgres user cannot write $PG_DIR: every directory above it must be" \
                "searchable by others (chmod o+x)" >&2
            exit 1
        fi
    fi
    as_pg mkdir -p "$PG_SOCKET_DIR"
    if [ ! -f "$PG_DATA/PG_VERSION" ]; then
        # peer authentication on the private socket (only the cluster's owner reaches it),
        # passwords over TCP on 127.0.0.1
        as_pg "$PG_BIN/initdb" -D "$PG_DATA" --no-locale --encoding=UTF8 --auth-local=peer \
            --auth-host=scram-sha-256 >"$RUN_DIR/initdb.log" 2>&1 \
            || { tail -30 "$RUN_DIR/initdb.log" >&2; exit 1; }
    fi
    local server=("$PG_BIN/postgres" -D "$PG_DATA" -p "$POSTGRES_PORT"
        -c "listen_addresses=$HOST" -c "unix_socket_directories=$PG_SOCKET_DIR")
    if [ "$AS_ROOT" = 1 ]; then
        # setpriv, not runuser: it execs, so the PID file holds the postmaster's own PID
        (cd "$PG_DIR" && launch postgres setpriv --reuid=postgres --regid=postgres --init-groups \
            -- "${server[@]}")
    else
        (cd "$PG_DIR" && launch postgres "${server[@]}")
    fi
    wait_until postgres "answer on $HOST:$POSTGRES_PORT" pg_ready
    ensure_database airflow "$AIRFLOW_DB_PASSWORD"
    ensure_database mlflow "$MLFLOW_DB_PASSWORD"
}

redis_ping() { REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h "$HOST" -p "$REDIS_PORT" ping | grep -q PONG; }

start_redis() {
    mkdir -p "$REDIS_DIR"
    (
        umask 077
        cat >"$REDIS_DIR/redis.conf" <<EOF
bind $HOST
port $REDIS_PORT
protected-mode yes
requirepass $REDIS_PASSWORD
dir $REDIS_DIR
save ""
appendonly no
daemonize no
logfile ""
EOF
    )
    launch redis redis-server "$REDIS_DIR/redis.conf"
    wait_until redis "PONG on $HOST:$REDIS_PORT" redis_ping
}

start_mlflow() {
    mkdir -p "$MLFLOW_ARTIFACTS"
    # The backend URI (with its password) goes by environment, not on the command line. The
    # job-execution worker (huey) is not needed: no MLflow jobs are submitted.
    launch mlflow env MLFLOW_BACKEND_STORE_URI="$MLFLOW_BACKEND" \
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
        "$VENV_BIN/mlflow" server --artifacts-destination "$MLFLOW_ARTIFACTS" \
        --host "$HOST" --port "$MLFLOW_PORT" --workers 1
}

worker_names() {  # the workers this start runs, or (for stop/status) those with a PID file
    if [ "${1:-}" = started ]; then
        local f
        for f in "$RUN_DIR"/worker-*.pid; do [ -e "$f" ] && basename "$f" .pid; done
        return 0
    fi
    local i
    for i in $(seq 1 "$CELERY_WORKERS"); do echo "worker-$i"; done
}

start_airflow() {
    "$VENV_BIN/airflow" db migrate >"$RUN_DIR/db-migrate.log" 2>&1 \
        || { tail -30 "$RUN_DIR/db-migrate.log" >&2; exit 1; }
    launch api-server "$VENV_BIN/airflow" api-server
    wait_until api-server "answer on $AIRFLOW_API" curl -fsS "$AIRFLOW_API/api/v2/monitor/health"
    launch scheduler "$VENV_BIN/airflow" scheduler --skip-serve-logs
    launch dag-processor "$VENV_BIN/airflow" dag-processor
    local host name
    host="$(uname -n)"
    # One after the other: a starting worker creates Celery's result tables in the metadata DB,
    # and two doing it at once can collide. "<hostname> ready." is Celery's line once it consumes.
    for name in $(worker_names); do
        launch "$name" env CELERY_WORKER_HOSTNAME="$name@$host" \
            "$VENV_BIN/airflow" celery worker --celery-hostname "$name@$host" --skip-serve-logs
        wait_until "$name" "'$name@$host ready.' line" \
            grep -qF "$name@$host ready." "$RUN_DIR/$name.log"
    done
}

start() {
    configure
    start_postgres
    start_redis
    start_mlflow  # creates its tables while Airflow migrates its own
    start_airflow
    wait_until mlflow "answer on $MLFLOW_URL/health" curl -fsS "$MLFLOW_URL/health"
    echo "Airflow UI and REST API: $AIRFLOW_API (user admin, password in" \
        "$AIRFLOW_HOME/simple_auth_manager_passwords.json.generated)"
    echo "MLflow: $MLFLOW_URL; INSTANTREC_HOME: $INSTANTREC_HOME"
}

stop() {
    local name
    # clients first, the stores they write to last
    for name in $(worker_names started) dag-processor scheduler api-server mlflow redis postgres; do
        case "$name" in
            # the leader only: a worker's warm shutdown lets its pool finish the running task;
            # the postmaster stops its own server processes (smart shutdown)
            worker-* | postgres) stop_one "$name" leader ;;
            *) stop_one "$name" ;;
        esac
    done
}

status() {
    if [ ! -f "$SETTINGS" ]; then
        echo "never started: no $SETTINGS"
        return 0
    fi
    configure
    echo "Airflow $AIRFLOW_API, MLflow $MLFLOW_URL, Postgres $HOST:$POSTGRES_PORT," \
        "Redis $HOST:$REDIS_PORT"
    # shellcheck disable=SC2046
    report postgres redis mlflow api-server scheduler dag-processor $(worker_names started)
}

print_env() {
    configure >/dev/null
    local name
    for name in "${EXPORTED[@]}"; do printf 'export %s=%q\n' "$name" "${!name}"; done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|status|restart|env" >&2; exit 2 ;;
esac
