#!/usr/bin/env bash
# Runs one of Kafka's command line tools against the local broker, from the jars fetch.sh
# downloaded (there is no Kafka distribution with its bin/*.sh here).
#
#   kafka-tool.sh topics --list
#   kafka-tool.sh topics --describe --topic usage-events
#   kafka-tool.sh consume --topic usage-events --from-beginning --isolation-level read_committed
#   kafka-tool.sh groups --describe --all-groups
#   kafka-tool.sh transactions list
#   kafka-tool.sh produce --topic scratch
#   kafka-tool.sh org.apache.kafka.tools.SomeOtherTool ...   (any main class)
#
# --bootstrap-server is added for the tools that take it, pointing at $TRIBUTARY_KAFKA_BOOTSTRAP.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/env.sh
. "$here/env.sh"

usage() {
  sed -n '2,15p' "$0" >&2
  exit 2
}

(($#)) || usage
tool=$1
shift
case "$tool" in
  topics) class=org.apache.kafka.tools.TopicCommand ;;
  consume) class=org.apache.kafka.tools.consumer.ConsoleConsumer ;;
  produce) class=org.apache.kafka.tools.ConsoleProducer ;;
  groups) class=org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
  transactions) class=org.apache.kafka.tools.TransactionsCommand ;;
  configs) class=org.apache.kafka.tools.ConfigCommand ;;
  -h | --help) usage ;;
  *.*) class=$tool ;;
  *) usage ;;
esac

libs="$TRIBUTARY_KAFKA_HOME/libs"
[[ -d "$libs" ]] || { echo "no Kafka jars in $libs: run deploy/local/fetch.sh kafka" >&2; exit 1; }

args=()
[[ "$tool" == *.* ]] || args=(--bootstrap-server "$TRIBUTARY_KAFKA_BOOTSTRAP")
exec "$TRIBUTARY_JAVA" -Xmx256m -Dlog4j2.configurationFile="$here/kafka/tools-log4j2.xml" \
  -cp "$libs/*" "$class" "${args[@]}" "$@"
