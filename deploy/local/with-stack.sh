#!/usr/bin/env bash
# Runs a command with the local stack up: starts the stack if it is not running, runs the
# command with the stack's addresses in its environment, and stops afterwards only what it
# started, so that a developer's running stack is left alone.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
. "$here/env.sh"

started=0
if ! "$here/status.sh" >/dev/null 2>&1; then
  "$here/up.sh"
  started=1
fi
# What a failed run leaves for whoever reads only its output (CI): whether the stack was still
# healthy at the end, the disk space left, and the tail of each component's log. A broker that
# died mid-run shows up here as the reason why every later test timed out.
diagnose() {
  echo "with-stack: the stack after the failure:" >&2
  "$here/status.sh" >&2 || true
  df -h "$TRIBUTARY_RUN_DIR" "${CARGO_TARGET_DIR:-.}" 2>/dev/null | sed 's/^/  /' >&2 || true
  local log
  for log in "$TRIBUTARY_LOG_DIR"/*.log; do
    [[ -f "$log" ]] || continue
    echo "--- last lines of $log" >&2
    grep -v -E '^\s*at |^\s*\.\.\. [0-9]+ more' "$log" | tail -n 10 >&2 || true
  done
}
stop_if_started() {
  local code=$?
  if [[ $code != 0 ]]; then
    diagnose
  fi
  if [[ $started == 1 ]]; then
    "$here/down.sh" || true
  fi
  if [[ $code != 0 ]]; then
    echo "with-stack: '$*' failed (exit $code); stack logs are in $TRIBUTARY_LOG_DIR" >&2
  fi
  exit "$code"
}
trap 'stop_if_started "$@"' EXIT
"$@"
