# shellcheck shell=bash
# shellcheck disable=SC2034 # variables here are used by the scripts that source this file
# Tributary local stack: helpers shared by fetch.sh, up.sh, down.sh and status.sh.
#
# A component is a long-running server process identified by
#   - a pid file, $TRIBUTARY_RUN_DIR/pids/<name>.pid, written when it is started, and
#   - a marker: a fixed piece of its command line that names this run dir, so a pid reused by
#     an unrelated process is never mistaken for ours, and strays (a pid file lost, a crashed
#     up.sh) can still be found with pgrep.

TRIBUTARY_PID_DIR="$TRIBUTARY_RUN_DIR/pids"

tb_log() { printf '[tributary] %s\n' "$*" >&2; }

tb_die() {
  tb_log "error: $*"
  exit 1
}

# Runs the rest of the calling script under an exclusive lock on the cache dir, so two up.sh
# (parallel test processes) or an up.sh racing a down.sh do not start or stop things twice.
# Nested scripts (up.sh runs fetch.sh) see TRIBUTARY_LOCK_HELD and do not wait on themselves.
tb_lock() {
  [[ -n "${TRIBUTARY_LOCK_HELD:-}" ]] && return 0
  mkdir -p "$TRIBUTARY_CACHE_DIR"
  exec 9>"$TRIBUTARY_CACHE_DIR/.lock"
  if ! flock -w 600 9; then
    tb_die "another Tributary stack script holds $TRIBUTARY_CACHE_DIR/.lock for 10 minutes"
  fi
  export TRIBUTARY_LOCK_HELD=1
}

# Seconds since the epoch with a fraction, for timings printed to the user.
tb_now() { date +%s.%N; }

tb_elapsed() { awk -v a="$1" -v b="$(tb_now)" 'BEGIN { printf "%.1f", b - a }'; }

# Escapes a fixed string for use as an extended regular expression (pgrep -f takes one).
tb_regex_escape() { printf '%s' "$1" | sed 's/[][\.*^$+?(){}|/]/\\&/g'; }

tb_pid_file() { printf '%s/%s.pid' "$TRIBUTARY_PID_DIR" "$1"; }

# Full command line of a pid, or nothing. -ww: never cut to the terminal width, since the
# marker may sit far into a long java command line.
tb_args_of() { ps -ww -o args= -p "$1" 2>/dev/null || true; }

# Prints the pids of every process whose command line contains the marker.
tb_marker_pids() { pgrep -f -- "$(tb_regex_escape "$1")" || true; }

# Prints the pid of a running component (name, marker), or returns 1.
# The pid file is trusted only if that pid's command line carries the marker; otherwise a
# process found by the marker is adopted and the pid file rewritten.
tb_running_pid() {
  local name=$1 marker=$2 pidfile pid
  pidfile=$(tb_pid_file "$name")
  if [[ -f "$pidfile" ]]; then
    pid=$(<"$pidfile")
    if [[ "$pid" =~ ^[0-9]+$ && "$(tb_args_of "$pid")" == *"$marker"* ]]; then
      printf '%s\n' "$pid"
      return 0
    fi
  fi
  pid=$(tb_marker_pids "$marker" | head -n 1)
  if [[ -n "$pid" ]]; then
    mkdir -p "$TRIBUTARY_PID_DIR"
    printf '%s\n' "$pid" >"$pidfile"
    printf '%s\n' "$pid"
    return 0
  fi
  return 1
}

# Starts a server in the background: tb_start NAME STDOUT_LOG COMMAND...
# setsid gives it its own session, so it outlives the calling shell and its terminal and
# receives no signal meant for the caller's process group (Ctrl-C in a test run). stdin is
# /dev/null and stdout/stderr go to the log, so the caller's pipes are never held open (a
# `$(up.sh)` or a CI step would otherwise wait for the server to exit). `9>&-` closes the
# lock's file descriptor (tb_lock): a server inheriting it would hold the lock for its life
# and every later up.sh or down.sh would wait on it.
tb_start() {
  local name=$1 log=$2
  shift 2
  mkdir -p "$TRIBUTARY_PID_DIR" "$(dirname "$log")"
  printf '\n===== %s starting %s =====\n' "$(date -Is)" "$name" >>"$log"
  setsid "$@" </dev/null >>"$log" 2>&1 9>&- &
  printf '%s\n' "$!" >"$(tb_pid_file "$name")"
}

# Prints the last lines of each log given, to stderr, to explain a failure.
tb_show_logs() {
  local f
  for f in "$@"; do
    [[ -f "$f" ]] || continue
    printf '\n----- last 40 lines of %s -----\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

# Waits until a health check passes:
#   tb_wait_healthy NAME MARKER TIMEOUT "LOG..." CHECK_COMMAND...
# Fails fast if the process exits, and after TIMEOUT seconds otherwise, printing the logs.
tb_wait_healthy() {
  local name=$1 marker=$2 timeout=$3 logs=$4 started
  shift 4
  started=$(date +%s)
  while true; do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    if ! tb_running_pid "$name" "$marker" >/dev/null; then
      tb_log "$name exited during startup"
      # shellcheck disable=SC2086 # $logs is a space-separated list of paths without spaces
      tb_show_logs $logs
      return 1
    fi
    if (($(date +%s) - started >= timeout)); then
      tb_log "$name not healthy after ${timeout}s"
      # shellcheck disable=SC2086
      tb_show_logs $logs
      return 1
    fi
    sleep 0.5
  done
}

# Stops a component: SIGTERM (to its process group when it leads one, to catch any children),
# then SIGKILL after TRIBUTARY_STOP_TIMEOUT seconds. Also stops strays carrying the marker.
tb_stop() {
  local name=$1 marker=$2 pids pid pgid waited=0
  pids=$( {
    tb_running_pid "$name" "$marker" || true
    tb_marker_pids "$marker"
  } | sort -u)
  if [[ -z "$pids" ]]; then
    rm -f "$(tb_pid_file "$name")"
    return 0
  fi
  tb_log "stopping $name (pid $(echo "$pids" | paste -sd, -))"
  for pid in $pids; do
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ' || true)
    if [[ "$pgid" == "$pid" ]]; then
      kill -TERM -- "-$pid" 2>/dev/null || true
    else
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  while [[ -n "$(tb_marker_pids "$marker")" ]]; do
    if ((waited >= TRIBUTARY_STOP_TIMEOUT * 2)); then
      tb_log "$name still running after ${TRIBUTARY_STOP_TIMEOUT}s; sending SIGKILL"
      for pid in $(tb_marker_pids "$marker"); do
        kill -KILL "$pid" 2>/dev/null || true
      done
      sleep 0.5
      break
    fi
    sleep 0.5
    waited=$((waited + 1))
  done
  rm -f "$(tb_pid_file "$name")"
  if [[ -n "$(tb_marker_pids "$marker")" ]]; then
    tb_log "$name could not be stopped: $(tb_marker_pids "$marker" | paste -sd, -)"
    return 1
  fi
  mapfile -t -O "${#TB_STOPPED_PIDS[@]}" TB_STOPPED_PIDS <<<"$pids"
}

# Pids stopped by tb_stop, for tb_wait_reaped.
TB_STOPPED_PIDS=()

# An exited server stays a zombie ("[java] <defunct>" in pgrep) until init reaps it, which
# here takes about 2 s. Waits for that, once for all stopped servers (5 s at most; a zombie
# holds nothing, not even its port), so "nothing left" can be checked right after down.sh.
tb_wait_reaped() {
  ((${#TB_STOPPED_PIDS[@]})) || return 0
  local pids i
  pids=$(IFS=,; echo "${TB_STOPPED_PIDS[*]}")
  for i in {1..20}; do
    ps -o pid= -p "$pids" >/dev/null 2>&1 || return 0
    sleep 0.25
  done
  tb_log "not yet reaped by init after 5 s (harmless zombies): $pids"
}

# --- Checksums ---------------------------------------------------------------------------

# Checksum of a folder's files: their paths (relative to it) and contents, in a fixed order.
# Compiled Python (__pycache__, *.pyc) and the stamp fetch.sh writes into a copy are left out,
# so a folder and its copy in the Tryton virtualenv give the same sum.
tb_tree_sum() {
  (cd "$1" && find . -type f ! -path '*/__pycache__/*' ! -name '*.pyc' ! -name .tributary-sum \
    -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum) | sha256sum | cut -d' ' -f1
}

# --- Java ----------------------------------------------------------------------------------

# Major version of a java executable ("17", "25"), or nothing.
tb_java_major() {
  # sed reads all of java's output (no `head`), so that java never meets a closed pipe.
  "$1" -version 2>&1 | sed -nE '1s/.*version "(1\.)?([0-9]+).*/\2/p'
}

# Prints a java executable whose major version is at least $1: TRIBUTARY_JAVA when it is new
# enough, else the oldest sufficient JDK under /usr/lib/jvm (oldest: closest to what the
# program was built for). Returns 1 if there is none.
tb_find_java() {
  local min=$1 candidate major best="" best_major=999
  major=$(tb_java_major "$TRIBUTARY_JAVA" 2>/dev/null || true)
  if [[ "$major" =~ ^[0-9]+$ ]] && ((major >= min)); then
    printf '%s\n' "$TRIBUTARY_JAVA"
    return 0
  fi
  for candidate in /usr/lib/jvm/*/bin/java; do
    [[ -x "$candidate" ]] || continue
    major=$(tb_java_major "$candidate" 2>/dev/null || true)
    [[ "$major" =~ ^[0-9]+$ ]] || continue
    if ((major >= min && major < best_major)); then
      best=$candidate
      best_major=$major
    fi
  done
  [[ -n "$best" ]] || return 1
  printf '%s\n' "$best"
}

# The registry's launcher jar: Quarkus "fast-jar" layout (3.1+) or legacy "-runner.jar" (3.0).
tb_registry_jar() {
  local jar
  for jar in "$TRIBUTARY_APICURIO_HOME/quarkus-run.jar" "$TRIBUTARY_APICURIO_HOME"/*-runner.jar; do
    if [[ -f "$jar" ]]; then
      printf '%s\n' "$jar"
      return 0
    fi
  done
  return 1
}

# --- The three components: names, markers, logs, health checks ------------------------------

TRIBUTARY_KAFKA_CONF="$TRIBUTARY_RUN_DIR/kafka/server.properties"
TRIBUTARY_TRYTON_CONF="$TRIBUTARY_RUN_DIR/tryton/trytond.conf"

# Markers. Kafka and the registry carry -D properties that only identify them; Tryton is
# recognised by its config file, which lives in the run dir.
TRIBUTARY_KAFKA_MARKER="-Dtributary.component=kafka -Dtributary.run.dir=$TRIBUTARY_RUN_DIR "
TRIBUTARY_REGISTRY_MARKER="-Dtributary.component=registry -Dtributary.run.dir=$TRIBUTARY_RUN_DIR "
TRIBUTARY_TRYTON_MARKER="trytond -c $TRIBUTARY_TRYTON_CONF "
# Services started by demo.sh run with their configuration copied into the run dir.
TRIBUTARY_USAGE_INGEST_MARKER="--config $TRIBUTARY_RUN_DIR/usage-ingest.toml"

TRIBUTARY_KAFKA_LOGS="$TRIBUTARY_LOG_DIR/kafka.out $TRIBUTARY_LOG_DIR/kafka-server.log"
TRIBUTARY_REGISTRY_LOGS="$TRIBUTARY_LOG_DIR/registry.log"
TRIBUTARY_TRYTON_LOGS="$TRIBUTARY_LOG_DIR/tryton.log"

tb_health() { "$TRIBUTARY_PYTHON" "$TRIBUTARY_LOCAL_DIR/health.py" "$@"; }
tb_kafka_healthy() { tb_health kafka; }
tb_registry_healthy() { tb_health registry; }
tb_tryton_healthy() { tb_health tryton; }
