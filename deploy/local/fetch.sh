#!/usr/bin/env bash
# Fetches what the local stack runs, into $TRIBUTARY_CACHE_DIR, on first use only:
#   kafka-<v>/libs/                 Kafka broker + tools jars, from Maven Central (kafka/pom.xml)
#   apicurio-registry-<v>/          Apicurio Registry (Quarkus app), from Maven Central
#   tryton-venv-<v>/                virtualenv with trytond + modules + proteus, from PyPI, plus
#                                   this repository's own modules (tryton/modules/*), copied in
#
# Each one is complete only when its stamp file (.complete) exists and holds the inputs it was
# built from (versions, the pom's or requirements' checksum). A download that was cut short
# has no stamp and is thrown away and redone; a changed pin or pom gives a different stamp and
# is redone too. Kafka and Apicurio are assembled in a .partial folder renamed into place at
# the end, so their final folder never holds half a download.
#
# Usage: fetch.sh [kafka|registry|tryton]...   (default: all three)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/env.sh
. "$here/env.sh"
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

# The stamp's content: everything that, when changed, must cause a fresh download.
stamp_of() {
  case "$1" in
    kafka) printf 'kafka %s log4j %s pom %s\n' "$KAFKA_VERSION" "$LOG4J_VERSION" \
      "$(sha256sum <"$here/kafka/pom.xml" | cut -d' ' -f1)" ;;
    registry) printf 'apicurio-registry %s\n' "$APICURIO_VERSION" ;;
    tryton) printf 'python %s requirements %s\n' \
      "$("$TRIBUTARY_PYTHON" -c 'import sys; print(sys.version.split()[0])')" \
      "$(sha256sum <"$here/tryton/requirements.txt" | cut -d' ' -f1)" ;;
  esac
}

# True if folder $1 holds a complete download for component $2.
is_complete() { [[ -f "$1/.complete" && "$(<"$1/.complete")" == "$(stamp_of "$2")" ]]; }

# Maven, quiet and in batch mode (no progress bars). Debian's Maven 3.8.7 prints colour codes
# even then (and with -Dstyle.color=never), so they are filtered out; pipefail keeps mvn's
# exit status.
mvn_quiet() {
  "$TRIBUTARY_MVN" -B -q "$@" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2
}

fetch_kafka() {
  local home=$TRIBUTARY_KAFKA_HOME partial
  is_complete "$home" kafka && return 0
  tb_log "fetching Kafka $KAFKA_VERSION (Maven Central) into $home"
  local started
  started=$(tb_now)
  partial="$home.partial"
  rm -rf "$partial"
  mvn_quiet -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -Dkafka.version="$KAFKA_VERSION" -Dlog4j.version="$LOG4J_VERSION" \
    -DincludeScope=runtime -DoutputDirectory="$partial/libs"
  # The two entry points up.sh uses must be there, or the broker would fail later, obscurely.
  local jar="$partial/libs/kafka_2.13-$KAFKA_VERSION.jar"
  [[ -f "$jar" ]] || tb_die "Kafka download incomplete: no $jar"
  # grep reads the whole listing (no -q): with pipefail, a grep that stops at the first match
  # kills unzip with SIGPIPE and fails the pipeline although the class is there.
  unzip -l "$jar" | grep 'kafka/tools/StorageTool.class' >/dev/null ||
    tb_die "$jar has no kafka.tools.StorageTool"
  unzip -l "$jar" | grep ' kafka/Kafka.class' >/dev/null || tb_die "$jar has no kafka.Kafka"
  stamp_of kafka >"$partial/.complete"
  rm -rf "$home"
  mv "$partial" "$home"
  tb_log "Kafka fetched in $(tb_elapsed "$started")s"
}

fetch_registry() {
  local home=$TRIBUTARY_APICURIO_HOME partial
  is_complete "$home" registry && return 0
  tb_log "fetching Apicurio Registry $APICURIO_VERSION (Maven Central) into $home"
  local started
  started=$(tb_now)
  partial="$home.partial"
  rm -rf "$partial"
  mkdir -p "$partial"
  # The app is published on Maven Central as a tar.gz of the Quarkus application folder.
  mvn_quiet dependency:copy \
    -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
    -DoutputDirectory="$partial"
  local tarball="$partial/apicurio-registry-app-$APICURIO_VERSION-all.tar.gz"
  tar -xzf "$tarball" -C "$partial"
  rm -f "$tarball"
  # 3.1+ unpack to quarkus-run.jar + lib/ + app/; 3.0 to apicurio-registry-app-<v>-runner.jar + lib/.
  TRIBUTARY_APICURIO_HOME="$partial" tb_registry_jar >/dev/null ||
    tb_die "Apicurio download has neither quarkus-run.jar nor *-runner.jar"
  stamp_of registry >"$partial/.complete"
  rm -rf "$home"
  mv "$partial" "$home"
  tb_log "Apicurio Registry fetched in $(tb_elapsed "$started")s"
}

fetch_tryton() {
  build_tryton_venv
  install_tryton_modules
}

build_tryton_venv() {
  # A virtualenv cannot be moved after creation (its scripts name its absolute path), so it
  # is built in place; without a matching stamp it is deleted and rebuilt from scratch.
  local venv=$TRIBUTARY_TRYTON_VENV
  is_complete "$venv" tryton && return 0
  tb_log "installing Tryton (PyPI) into $venv"
  local started
  started=$(tb_now)
  rm -rf "$venv"
  "$TRIBUTARY_PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$here/tryton/requirements.txt"
  "$venv/bin/python" -c 'import trytond.modules.account_invoice, proteus' ||
    tb_die "Tryton install incomplete"
  stamp_of tryton >"$venv/.complete"
  tb_log "Tryton installed in $(tb_elapsed "$started")s"
}

# This repository's own Tryton modules (tryton/modules/<name>, e.g. tributary_erp) go into
# the virtualenv's trytond/modules folder, where trytond finds a module by its folder name
# (trytond.modules.<name>). Copied, not linked or pip-installed in editable mode: the venv is
# shared by every checkout, and a link would tie it to one of them (and break when that
# checkout moves). Each copy holds the checksum of what it was copied from (.tributary-sum);
# a copy whose sum differs from this checkout's folder is replaced, so every up.sh runs its
# own checkout's version. A running trytond is unaffected: it imported its modules at start.
# The copy is assembled under a name with a dot, which trytond's module scan skips, and
# renamed into place.
install_tryton_modules() {
  local venv=$TRIBUTARY_TRYTON_VENV modules src name sum dest
  modules=$("$venv/bin/python" -c \
    'import importlib.util as u; print(u.find_spec("trytond.modules").submodule_search_locations[0])') ||
    tb_die "no trytond in $venv"
  for src in "$here/tryton/modules"/*/; do
    [[ -f "$src/tryton.cfg" ]] || continue
    name=$(basename "$src")
    sum=$(tb_tree_sum "$src")
    dest="$modules/$name"
    [[ -f "$dest/.tributary-sum" && "$(<"$dest/.tributary-sum")" == "$sum" ]] && continue
    tb_log "installing Tryton module $name into $venv"
    rm -rf "$dest.partial"
    cp -R "$src" "$dest.partial"
    rm -rf "$dest.partial/__pycache__"
    printf '%s\n' "$sum" >"$dest.partial/.tributary-sum"
    rm -rf "$dest"
    mv "$dest.partial" "$dest"
  done
}

main() {
  local components=("$@")
  ((${#components[@]})) || components=(kafka registry tryton)
  tb_lock
  local c
  for c in "${components[@]}"; do
    case "$c" in
      kafka | registry | tryton) "fetch_$c" ;;
      *) tb_die "unknown component '$c' (expected kafka, registry or tryton)" ;;
    esac
  done
}

main "$@"
