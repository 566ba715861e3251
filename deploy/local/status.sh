#!/usr/bin/env bash
# Prints the health of each part of the local Tributary stack, one line each:
#   kafka     up    pid 1234  kafka ok: cluster ..., brokers 1@127.0.0.1:19092, controller 1
#   registry  down  -         not running
# Exits 0 if all are healthy, 1 otherwise. Reads only; takes no lock, so it can run while
# up.sh is still waiting.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/env.sh
. "$here/env.sh"
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

# status_of NAME MARKER CHECK: prints the line, returns 1 when not healthy.
status_of() {
  local name=$1 marker=$2 check=$3 pid detail
  if ! pid=$(tb_running_pid "$name" "$marker"); then
    printf '%-13s %-5s %-10s %s\n' "$name" down - "not running"
    return 1
  fi
  if detail=$("$check" 2>&1); then
    printf '%-13s %-5s %-10s %s\n' "$name" up "pid $pid" "$detail"
  else
    printf '%-13s %-5s %-10s %s\n' "$name" down "pid $pid" "running but unhealthy: $detail"
    return 1
  fi
}

usage_ingest_ready() {
  curl -sf http://127.0.0.1:19101/health/ready >/dev/null && echo "ready: HTTP on 127.0.0.1:18090, admin on 127.0.0.1:19101"
}

main() {
  local failed=0
  status_of kafka "$TRIBUTARY_KAFKA_MARKER" tb_kafka_healthy || failed=1
  status_of registry "$TRIBUTARY_REGISTRY_MARKER" tb_registry_healthy || failed=1
  status_of tryton "$TRIBUTARY_TRYTON_MARKER" tb_tryton_healthy || failed=1
  # Services started by the demo are shown when they run; not running is not a failure.
  if tb_running_pid usage-ingest "$TRIBUTARY_USAGE_INGEST_MARKER" >/dev/null; then
    status_of usage-ingest "$TRIBUTARY_USAGE_INGEST_MARKER" usage_ingest_ready || failed=1
  fi
  printf 'logs: %s\n' "$TRIBUTARY_LOG_DIR"
  return "$failed"
}

main "$@"
