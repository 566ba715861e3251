# shellcheck shell=bash
# shellcheck disable=SC2034 # variables here are used by the scripts that source this file
# Tributary local stack: shared settings.
#
# Sourced by fetch.sh, up.sh, down.sh and status.sh, and meant to be sourced by a developer's
# shell or a test harness too (`. deploy/local/env.sh`) to get the client variables below.
# Every value is a default: anything already set in the environment wins, so a test run can
# move the whole stack (ports, folders) without editing this file.
#
# This file is sourced, so it sets no shell options of its own (no `set -e` here).

# --- Folders -------------------------------------------------------------------------------
# This folder (deploy/local), wherever the checkout is.
TRIBUTARY_LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Downloads (Kafka jars, Apicurio, the Tryton virtualenv) live outside the checkout: they are
# large, shared between checkouts, and must never end up in a commit.
: "${TRIBUTARY_CACHE_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/tributary}"
# Data folders, generated configs and pid files. Separate from the cache so `down.sh --purge`
# can wipe state without forcing a new download.
: "${TRIBUTARY_RUN_DIR:=$TRIBUTARY_CACHE_DIR/run}"
: "${TRIBUTARY_LOG_DIR:=$TRIBUTARY_RUN_DIR/logs}"

# --- Ports (127.0.0.1 only) ----------------------------------------------------------------
# Off the usual 9092/8081/8000 so a developer's own Kafka or registry does not collide.
: "${TRIBUTARY_KAFKA_PORT:=19092}"
: "${TRIBUTARY_KAFKA_CONTROLLER_PORT:=19093}"
: "${TRIBUTARY_REGISTRY_PORT:=18081}"
# Apicurio (Quarkus) also opens a management interface (health, metrics); pinned here so it
# does not take Quarkus' default 9000, which other tools like to use.
: "${TRIBUTARY_REGISTRY_MANAGEMENT_PORT:=18082}"
: "${TRIBUTARY_TRYTON_PORT:=18000}"

# --- Versions -------------------------------------------------------------------------------
# Kafka 4.4.0: newest 4.x on Maven Central when this was written; the broker needs Java 17+.
: "${KAFKA_VERSION:=4.4.0}"
# Log4j2 backend for Kafka's SLF4J 1.7 logging (see kafka/pom.xml for why not slf4j2-impl).
: "${LOG4J_VERSION:=2.26.1}"
# 3.3.3 where a Java 21+ JDK is installed (the machine's Temurin), else 3.0.9, the last release
# that runs on Java 17, so that a machine with only Java 17 still gets a working registry.
if [[ -z "${APICURIO_VERSION:-}" ]]; then
  APICURIO_VERSION=3.0.9
  for _tb_release in "${JAVA_HOME:-/nonexistent}/release" /usr/lib/jvm/*/release; do
    [[ -r "$_tb_release" ]] || continue
    _tb_major=$(sed -nE 's/^JAVA_VERSION="([0-9]+).*/\1/p' "$_tb_release")
    if [[ "$_tb_major" =~ ^[0-9]+$ ]] && ((_tb_major >= 21)); then
      APICURIO_VERSION=3.3.3
      break
    fi
  done
  unset _tb_release _tb_major
fi
# Apicurio 3.1+ is compiled for Java 21 (class files v65) although its parent pom says 17, so
# it gets its own JVM: TRIBUTARY_REGISTRY_JAVA if set, else the Java below if new enough, else
# the oldest JDK >= this under /usr/lib/jvm (the machine's Temurin JDK). 3.0.9, the last 3.0,
# runs on Java 17: APICURIO_VERSION=3.0.9 is the way out on a machine with no newer Java.
if [[ -z "${APICURIO_JAVA_MIN:-}" ]]; then
  case "$APICURIO_VERSION" in
    3.0.*) APICURIO_JAVA_MIN=17 ;;
    *) APICURIO_JAVA_MIN=21 ;;
  esac
fi
# Tryton's versions are pinned in tryton/requirements.txt; this one names the venv folder so a
# new pin gets a fresh venv instead of an in-place upgrade.
: "${TRYTOND_VERSION:=8.2.1}"

# Registry storage: "memory" (default: an in-memory H2 database, empty after every restart) or
# "file" (an H2 database file in the run dir, kept until `down.sh --purge`, like Kafka's data).
# With "memory", records that stay in Kafka across a restart carry schema ids the new registry
# does not know (or, after new registrations, knows as other schemas).
: "${TRIBUTARY_REGISTRY_STORAGE:=memory}"

# --- Tools --------------------------------------------------------------------------------
# The Java for Kafka (17+; Apicurio picks its own, above). JAVA_HOME wins over PATH, as with
# most JVM launchers.
if [[ -z "${TRIBUTARY_JAVA:-}" ]]; then
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    TRIBUTARY_JAVA="$JAVA_HOME/bin/java"
  else
    TRIBUTARY_JAVA=java
  fi
fi
: "${TRIBUTARY_REGISTRY_JAVA:=}"
: "${TRIBUTARY_MVN:=mvn}"
: "${TRIBUTARY_PYTHON:=python3}"
# Seconds to wait for a component to become healthy before giving up.
: "${TRIBUTARY_START_TIMEOUT:=120}"
# Seconds between SIGTERM and SIGKILL in down.sh.
: "${TRIBUTARY_STOP_TIMEOUT:=30}"

# --- Tryton ----------------------------------------------------------------------------------
: "${TRIBUTARY_TRYTON_DB:=tributary}"
: "${TRIBUTARY_TRYTON_USER:=admin}"
# Local development only. Tryton's default password rules refuse short passwords, so it is
# longer than 16 characters.
: "${TRIBUTARY_TRYTON_PASSWORD:=tributary-local-dev}"

# --- Derived paths (not meant to be overridden) ---------------------------------------------
TRIBUTARY_KAFKA_HOME="$TRIBUTARY_CACHE_DIR/kafka-$KAFKA_VERSION"
TRIBUTARY_APICURIO_HOME="$TRIBUTARY_CACHE_DIR/apicurio-registry-$APICURIO_VERSION"
TRIBUTARY_TRYTON_VENV="$TRIBUTARY_CACHE_DIR/tryton-venv-$TRYTOND_VERSION"

# --- What clients use -------------------------------------------------------------------------
export TRIBUTARY_KAFKA_BOOTSTRAP="127.0.0.1:$TRIBUTARY_KAFKA_PORT"
export TRIBUTARY_REGISTRY_URL="http://127.0.0.1:$TRIBUTARY_REGISTRY_PORT/apis/ccompat/v7"
export TRIBUTARY_TRYTON_URL="http://127.0.0.1:$TRIBUTARY_TRYTON_PORT/"
export TRIBUTARY_TRYTON_DB TRIBUTARY_TRYTON_USER TRIBUTARY_TRYTON_PASSWORD
export TRIBUTARY_CACHE_DIR TRIBUTARY_RUN_DIR TRIBUTARY_LOG_DIR
