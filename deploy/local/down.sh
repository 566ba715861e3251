#!/usr/bin/env bash
# Stops the local Tributary stack: every process up.sh (and demo.sh) started for this run dir.
#
#   down.sh           stop; data stays (Kafka topics, the Tryton database) for the next up.sh
#   down.sh --purge   stop and delete $TRIBUTARY_RUN_DIR (data, configs, logs); downloads in
#                     $TRIBUTARY_CACHE_DIR stay, so the next up.sh does not fetch again
#   down.sh tryton    stop only the components named (kafka, registry, tryton), e.g. to take
#                     the ERP away in a fault test; up.sh starts again what is not running
#
# Each process gets SIGTERM (Kafka then shuts down cleanly, which keeps its next start fast),
# then SIGKILL after TRIBUTARY_STOP_TIMEOUT seconds. Processes are found by pid file and by
# their command-line marker, so strays from a crashed up.sh are stopped too. Running it when
# nothing runs does nothing and exits 0; it exits 1 only if something could not be stopped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/env.sh
. "$here/env.sh"
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

main() {
  local purge=false arg failed=0
  local only=()
  for arg in "$@"; do
    case "$arg" in
      --purge) purge=true ;;
      -h | --help)
        sed -n '2,13p' "$0"
        exit 0
        ;;
      kafka | registry | tryton) only+=("$arg") ;;
      *) tb_die "unknown option '$arg' (expected --purge, kafka, registry or tryton)" ;;
    esac
  done
  if ((${#only[@]} > 0)); then
    $purge && tb_die "--purge stops everything; it does not take component names"
    tb_lock
    for arg in "${only[@]}"; do
      case "$arg" in
        kafka) tb_stop kafka "$TRIBUTARY_KAFKA_MARKER" || failed=1 ;;
        registry) tb_stop registry "$TRIBUTARY_REGISTRY_MARKER" || failed=1 ;;
        tryton) tb_stop tryton "$TRIBUTARY_TRYTON_MARKER" || failed=1 ;;
      esac
    done
    ((failed == 0)) || tb_die "some processes could not be stopped"
    tb_wait_reaped
    return 0
  fi
  local started
  started=$(tb_now)
  tb_lock
  # Clients first, the broker last: the registry and Tryton do not use Kafka here, but this
  # is the order that never leaves a client talking to a stopped server.
  tb_stop usage-ingest "$TRIBUTARY_USAGE_INGEST_MARKER" || failed=1
  tb_stop tryton "$TRIBUTARY_TRYTON_MARKER" || failed=1
  tb_stop registry "$TRIBUTARY_REGISTRY_MARKER" || failed=1
  tb_stop kafka "$TRIBUTARY_KAFKA_MARKER" || failed=1
  ((failed == 0)) || tb_die "some processes could not be stopped"
  tb_wait_reaped
  if $purge; then
    # Guard against an override pointing the run dir at the cache (or somewhere worse).
    case "$TRIBUTARY_RUN_DIR" in
      "" | / | "$HOME" | "$TRIBUTARY_CACHE_DIR") tb_die "refusing to delete '$TRIBUTARY_RUN_DIR'" ;;
    esac
    tb_log "deleting $TRIBUTARY_RUN_DIR"
    rm -rf "$TRIBUTARY_RUN_DIR"
  fi
  tb_log "stack down in $(tb_elapsed "$started")s"
}

main "$@"
