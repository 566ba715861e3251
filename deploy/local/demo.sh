#!/usr/bin/env bash
# The demo scenario, as far as the services are built: usage-ingest.
#
# Publishes a contract (5,000 LLM tokens included per month) for a fresh demo account with
# `tributary publish`, starts usage-ingest (deploy/config/usage-ingest.toml) against the running
# stack, sends usage over its HTTP endpoint the way a platform would (a batch, the same batch
# again, a batch with an invalid event, then more usage), and prints the running totals it
# wrote to usage.recorded and the threshold crossings (80/100/120 %) in usage.thresholds. The
# service keeps running for you to try (see README, "usage-ingest"); `make down` stops it.
#
# Needs the stack up (make up) and the workspace binaries built (cargo build --workspace --bins).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=SCRIPTDIR/env.sh
. "$here/env.sh"
# shellcheck source=SCRIPTDIR/lib.sh
. "$here/lib.sh"

bin_dir="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tributary/target}/debug"
config="$TRIBUTARY_RUN_DIR/usage-ingest.toml"
log="$TRIBUTARY_RUN_DIR/logs/usage-ingest.log"
endpoint="http://127.0.0.1:18090/v1/events"
key="tributary-local-dev-key"
account="acct_demo_$(date +%s)"

cli() {
  "$bin_dir/tributary" --bootstrap-servers "$TRIBUTARY_KAFKA_BOOTSTRAP" --registry-url "$TRIBUTARY_REGISTRY_URL" "$@"
}

publish_contract() {
  local now_ms start end renewal
  now_ms=$(date +%s%3N)
  start=$((now_ms - 10 * 86400000))
  end=$((now_ms + 355 * 86400000))
  renewal=$(date -u -d "@$((end / 1000))" +%Y-%m-%d)
  printf '
$ tributary publish refdata.contracts   (the contract of %s: 5,000 tokens a month)
' "$account"
  cli publish refdata.contracts <<JSON
{"envelope": {"account_id": "$account", "source": "demo-crm"}, "contract_id": "ctr_$account",
 "customer_id": "$account", "subscription_id": "sub_$account", "price_plan_id": "plan_pro_2026",
 "status": "ACTIVE", "term_start": $start, "term_end": $end, "renewal_date": "$renewal", "auto_renew": true,
 "notice_period_days": 30, "billing_period": "MONTHLY", "currency": "EUR", "contract_value": "12000",
 "included_usage": [{"meter": "llm_tokens", "included_quantity": "5000", "unit": "token", "threshold_percents": null}],
 "support_tier": "PREMIUM", "grace_days": 14, "deleted": false, "version": 1}
JSON
}

start_usage_ingest() {
  if tb_running_pid usage-ingest "$TRIBUTARY_USAGE_INGEST_MARKER" >/dev/null; then
    tb_log "usage-ingest already running"
    sleep 1 # it follows refdata.contracts continuously: give it the new contract
    return 0
  fi
  mkdir -p "$TRIBUTARY_RUN_DIR/logs"
  cp "$here/../config/usage-ingest.toml" "$config"
  TRIBUTARY__KAFKA__BOOTSTRAP_SERVERS="$TRIBUTARY_KAFKA_BOOTSTRAP" \
    TRIBUTARY__REGISTRY__URL="$TRIBUTARY_REGISTRY_URL" \
    tb_start usage-ingest "$log" "$bin_dir/usage-ingest" --config "$config"
  tb_log "usage-ingest starting (log: $log)"
  tb_wait_healthy usage-ingest "$TRIBUTARY_USAGE_INGEST_MARKER" 90 "$log" \
    curl -sf http://127.0.0.1:19101/health/ready
  tb_log "usage-ingest ready: HTTP on ${endpoint%/v1/events}, admin on http://127.0.0.1:19101"
}

event() { # id type data
  printf '{"specversion":"1.0","id":"%s","source":"demo-platform","type":"%s","subject":"%s","time":"%s","data":%s}' \
    "$1" "$2" "$account" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$3"
}

post() { # title body
  printf '\n$ POST %s  (%s)\n' "$endpoint" "$1"
  curl -s -w '  -> HTTP %{http_code}\n' "$endpoint" \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/cloudevents-batch+json' -d "$2"
}

# One line per usage.recorded record: window, meter, group-by values, running total.
summarise() {
  local script
  script=$(
    cat <<'PY'
import json, sys
row = "{:<15} {:<11} {:<13} {:<14} {:>8} {:>6}  {}"
print(row.format("window", "start", "meter", "dimensions", "total", "events", "revision"))
for line in sys.stdin:
    v = json.loads(line)["value"]
    dims = ",".join(k + "=" + x for k, x in sorted(v["dimensions"].items())) or "(all)"
    revision = str(v["sequence"]) + (" final" if v["is_final"] else "")
    print(row.format(v["window_kind"], v["window_start"][:10], v["meter"], dims,
                     v["total_quantity"], v["event_count"], revision))
PY
  )
  "$TRIBUTARY_PYTHON" -c "$script"
}

thresholds() {
  local script
  script=$(
    cat <<'PY'
import json, sys
for line in sys.stdin:
    v = json.loads(line)["value"]
    print("{:>4} % of {} {} crossed: used {}, overage {}, at {}".format(
        v["threshold_percent"], v["included_quantity"], v["unit"], v["used_quantity"],
        v["overage_quantity"], v["crossed_at"]))
PY
  )
  "$TRIBUTARY_PYTHON" -c "$script"
}

main() {
  publish_contract
  start_usage_ingest
  local batch
  batch="[$(event "$account-1" llm.completion '{"tokens":1200,"model":"large"}'),
          $(event "$account-2" llm.completion '{"tokens":800,"model":"small"}'),
          $(event "$account-3" api.request '{"region":"eu"}'),
          $(event "$account-4" user.login '{"user_id":"u-17"}')]"
  post "four events" "$batch"
  post "the same four again: accepted, and counted once" "$batch"
  post "one invalid event: the whole batch is refused with the reason" \
    "[$(event "$account-5" llm.completion '{"tokens":-3}'), $(event "$account-6" nobody.meters.this '{}')]"
  post "more usage: 2,000 + 2,500 tokens crosses 80 % of 5,000" \
    "[$(event "$account-7" llm.completion '{"tokens":2500,"model":"large"}')]"
  post "and 1,600 more crosses 100 % and 120 %" \
    "[$(event "$account-8" llm.completion '{"tokens":1600,"model":"large"}')]"
  printf '\nWaiting for the running totals (usage.recorded, every 2 s)...\n'
  sleep 5
  printf '\n$ tributary tap usage.recorded --from-beginning --key %s   (summarised)\n' "$account"
  cli tap usage.recorded --from-beginning --key "$account" | summarise
  printf '\n$ tributary tap usage.thresholds --from-beginning --key %s   (summarised)\n' "$account"
  cli tap usage.thresholds --from-beginning --key "$account" | thresholds
  printf '\nusage-ingest keeps running; `make down` stops it with the stack.\n'
}

main "$@"
