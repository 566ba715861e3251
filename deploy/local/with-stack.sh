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
stop_if_started() {
  local code=$?
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
