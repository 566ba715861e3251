#!/usr/bin/env bash
# Creates (or reuses) the Python venv of the test suite (read_confluent.py, deploy/k8s/check.py),
# and prints its python.
#
#   py=$(tests/python/setup.sh | tail -1)
#   "$py" tests/python/read_confluent.py expectations.json
#
# The venv lives outside the checkout, at ${TRIBUTARY_CACHE_DIR:-$HOME/.cache/tributary}/py-venv.
# A stamp file in it records the sha256 of requirements.txt (and the interpreter's version);
# while they match, this script only checks that the venv's python still starts and exits at
# once. When requirements.txt changes, the venv is rebuilt from scratch (so a removed pin does not
# linger). Only the python path goes to stdout, as the last (and only) line; everything else
# goes to stderr. Concurrent runs are serialized with flock.
#
# Environment:
#   TRIBUTARY_CACHE_DIR  where the venv goes (default ~/.cache/tributary, as deploy/local/env.sh)
#   TRIBUTARY_PYTHON     the interpreter to build the venv from (default python3; pins are for 3.11)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/requirements.txt"
cache_dir="${TRIBUTARY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tributary}"
venv="$cache_dir/py-venv"
py="$venv/bin/python"
stamp="$venv/.tributary-requirements.sha256"
base_python="${TRIBUTARY_PYTHON:-python3}"

log() { printf 'tests/python/setup.sh: %s\n' "$*" >&2; }

[[ -f "$requirements" ]] || { log "missing $requirements"; exit 1; }
req_hash="$(sha256sum "$requirements" | cut -d' ' -f1)"

# Stamp = requirements hash + the venv interpreter's version, one per line.
want_stamp() { printf '%s\n%s\n' "$req_hash" "$("$1" -c 'import sys; print(sys.version.split()[0])')"; }

up_to_date() {
  [[ -x "$py" && -f "$stamp" ]] || return 1
  local want
  want="$(want_stamp "$py" 2>/dev/null)" || return 1 # a venv whose base python is gone
  [[ "$(cat "$stamp")" == "$want" ]]
}

mkdir -p "$cache_dir"

# Fast path, no lock needed: nothing to change.
if up_to_date; then
  printf '%s\n' "$py"
  exit 0
fi

exec 9>"$cache_dir/py-venv.lock"
flock 9
# Another run may have finished the job while this one waited for the lock.
if up_to_date; then
  printf '%s\n' "$py"
  exit 0
fi

command -v "$base_python" >/dev/null || { log "no $base_python on PATH (set TRIBUTARY_PYTHON)"; exit 1; }
base_version="$("$base_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$base_version" != "3.11" ]]; then
  log "warning: requirements.txt was resolved on Python 3.11, building the venv with $base_version"
fi

start=$SECONDS
log "building $venv with $base_python ($base_version) from $requirements"
rm -f "$stamp"
# --clear: a rebuild starts empty, so pins removed from requirements.txt do not linger.
"$base_python" -m venv --clear "$venv" >&2
"$py" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements" >&2
# Fail here, not in the test, if the install is unusable.
"$py" -c 'import confluent_kafka, confluent_kafka.schema_registry.avro, fastavro, kubernetes_validate, yaml, cloudevents.core.bindings.http, prometheus_client.openmetrics.parser' >&2
want_stamp "$py" >"$stamp"
log "ready in $((SECONDS - start)) s (confluent-kafka $("$py" -c 'import importlib.metadata as m; print(m.version("confluent-kafka"))'), librdkafka $("$py" -c 'import confluent_kafka as c; print(c.libversion()[0])'))"

printf '%s\n' "$py"
