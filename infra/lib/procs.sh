# Process helpers shared by infra/local/airflow.sh and infra/scaled/loopback.sh (sourced, not
# run). Every component runs in the background in its own process group (setsid), with its PID
# in $RUN_DIR/NAME.pid and its output in $RUN_DIR/NAME.log, and is stopped by that PID.
#
# The caller sets RUN_DIR, START_TIMEOUT_S (how long wait_until polls) and STOP_TIMEOUT_S (how
# long stop_one waits after SIGTERM before SIGKILL). Needs setsid (util-linux); `listening`
# uses pgrep and ss when they are there.

pid_of() {  # pid_of NAME: the recorded PID if that process is alive, else nothing
    local file="$RUN_DIR/$1.pid" pid
    [ -f "$file" ] || return 0
    pid="$(cat "$file")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

launch() {  # launch NAME COMMAND...: in the background, leading its own process group
    local name="$1" pid
    shift
    pid="$(pid_of "$name")"
    if [ -n "$pid" ]; then
        echo "$name already running (PID $pid)"
        return 0
    fi
    # setsid: each component leads its own process group, so stop reaches its children (Celery's
    # pool, uvicorn's workers, the executor's and the DAG parsing processes) through one PID.
    # setsid, and `env` or setpriv in front of the command, exec: the recorded PID is the
    # component's own.
    setsid "$@" >"$RUN_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN_DIR/$name.pid"
    echo "$name started (PID $!, output $RUN_DIR/$name.log)"
}

wait_until() {  # wait_until NAME WHAT COMMAND...: poll COMMAND while NAME is alive
    local name="$1" what="$2" deadline=$((SECONDS + START_TIMEOUT_S))
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ -z "$(pid_of "$name")" ]; then
            echo "$name exited; its output:" >&2
            tail -30 "$RUN_DIR/$name.log" >&2
            exit 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "$name: no $what within ${START_TIMEOUT_S} s; its output:" >&2
            tail -30 "$RUN_DIR/$name.log" >&2
            exit 1
        fi
        sleep 0.5
    done
}

# stop_one NAME [group|leader]: SIGTERM, then SIGKILL to its process group after
# STOP_TIMEOUT_S. `group` (the default) sends SIGTERM to the whole group; `leader` to the
# leader only, for a component that stops its own children in order (a Celery worker's warm
# shutdown lets its pool finish the running task; the postmaster shuts its server processes
# down itself).
stop_one() {
    local name="$1" signal_to="${2:-group}" pid deadline began="$SECONDS"
    pid="$(pid_of "$name")"
    if [ -z "$pid" ]; then
        rm -f "$RUN_DIR/$name.pid"
        return 0
    fi
    if [ "$signal_to" = leader ]; then
        kill -TERM "$pid" 2>/dev/null || true
    else
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    fi
    deadline=$((SECONDS + STOP_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name (PID $pid) ignored SIGTERM for ${STOP_TIMEOUT_S} s: SIGKILL" >&2
    fi
    # SIGKILL the group either way: children the leader left behind go too
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$RUN_DIR/$name.pid"
    echo "$name stopped (PID $pid, $((SECONDS - began)) s)"
}

report() {  # report NAME...: running or not, then every socket their process groups listen on
    local name pid pids=""
    for name in "$@"; do
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
