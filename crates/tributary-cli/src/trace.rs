//! `tributary trace <correlation-id>`: one business story across every Tributary topic, in time
//! order: usage, thresholds, charges, postings and their results, payments, entitlement
//! changes, flags, CRM updates, renewal notices, webhook deliveries, and the dead letters of
//! the five services.
//!
//! How: one `read_committed` consumer assigned to every partition of every topic of the
//! deployment that exists, from `--since` (found with the broker's time index, so an old
//! story does not cost the whole history) to the end seen at start. Each record's
//! `correlation_id` header (written by every Tributary producer with the CloudEvents headers) is
//! compared without decoding; only the matches are decoded through the registry. A record
//! without the header (an external producer that writes none) is decoded to read its envelope.
//! The cost is therefore one pass over the bytes of those topics since `--since`: what the
//! broker serves and librdkafka fetches, not Avro decoding.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value as Json, json};
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::headers;
use tributary_contracts::json::value_to_json;
use tributary_contracts::registry::{RegistryClient, RegistryResolver};
use tributary_contracts::topics;
use tributary_runtime::kafka::{client_config, partitions_of, watermarks};

use crate::Connections;

/// The services whose dead letters a story may have.
const SERVICES: [&str; 5] = ["usage-ingest", "billing-router", "erp-poster", "entitlement-watcher", "renewal-notifier"];
const IDLE_CHECK: Duration = Duration::from_millis(500);
/// Nothing fetched for this long: the end is reached (a partition that ends in a transaction
/// marker, or that `--since` starts at its end, never reports a position at its high watermark).
const IDLE_END: Duration = Duration::from_secs(2);

/// `tributary trace` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct TraceArgs {
    /// The correlation id (`envelope.correlation_id`) of the story.
    correlation_id: String,
    /// Only records from this time on (RFC 3339, e.g. 2026-12-01T00:00:00Z); default: all.
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// After the records so far, keep printing new ones as they are committed.
    #[arg(long)]
    follow: bool,
    /// One JSON object per record (topic, partition, offset, key, trace id, value) instead of
    /// the timeline.
    #[arg(long)]
    json: bool,
}

/// One record of the story.
#[derive(Debug)]
struct Step {
    occurred_at: i64,
    topic: String,
    partition: i32,
    offset: i64,
    key: Option<String>,
    trace_id: Option<String>,
    /// When the broker appended it.
    appended_at: i64,
    value: Json,
}

pub(crate) async fn run(connections: &Connections, args: &TraceArgs) -> anyhow::Result<ExitCode> {
    let registry = &connections.registry;
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    let codec = Codec::new(Arc::new(RegistryResolver::new(client)));
    let consumer: StreamConsumer = client_config(&connections.kafka)
        .set("group.id", format!("tributary-trace-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "50")
        .create()
        .context("creating the consumer")?;

    let prefix = &connections.kafka.topic_prefix;
    let mut names: Vec<String> = topics::ALL.iter().map(|spec| format!("{prefix}{}", spec.name)).collect();
    names.extend(SERVICES.iter().map(|service| format!("{prefix}{service}{}", topics::DLQ_SUFFIX)));
    let mut assignment = TopicPartitionList::new();
    let mut ends: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for topic in &names {
        let partitions = partitions_of(&consumer, topic).unwrap_or_default();
        for partition in partitions {
            let (low, high) = watermarks(&consumer, topic, partition)?;
            let start = match args.since {
                Some(since) => offset_at(&consumer, topic, partition, since)?.unwrap_or(high).max(low),
                None => low,
            };
            if high > start {
                ends.insert((topic.clone(), partition), high);
            }
            assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
        }
    }
    anyhow::ensure!(assignment.count() > 0, "no Tributary topic found (topic prefix {prefix:?})");
    consumer.assign(&assignment)?;

    let mut steps = Vec::new();
    let mut done_reading = ends.is_empty();
    let mut last_record = std::time::Instant::now();
    while !done_reading {
        match tokio::time::timeout(IDLE_CHECK, consumer.recv()).await {
            Err(_) => {}
            Ok(message) => {
                last_record = std::time::Instant::now();
                let message = message.context("consuming")?;
                if let Some(step) = step_of(&codec, &message, &args.correlation_id, prefix).await {
                    steps.push(step);
                }
            }
        }
        done_reading = last_record.elapsed() >= IDLE_END || reached_ends(&consumer, &ends)?;
    }
    order(&mut steps);
    if steps.is_empty() && !args.follow {
        eprintln!("no record carries correlation id {}", args.correlation_id);
        return Ok(ExitCode::FAILURE);
    }
    for step in &steps {
        print_step(step, args.json);
    }
    if args.follow {
        loop {
            let message = consumer.recv().await.context("consuming")?;
            if let Some(step) = step_of(&codec, &message, &args.correlation_id, prefix).await {
                print_step(&step, args.json);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Time order; a record decided at the same millisecond as its cause (a charge and the crossing
/// it rates) after that cause, by the depth of its causation chain, then by append time.
fn order(steps: &mut [Step]) {
    let causes: BTreeMap<String, String> = steps
        .iter()
        .filter_map(|s| {
            let envelope = &s.value["envelope"];
            Some((envelope["event_id"].as_str()?.to_owned(), envelope["causation_id"].as_str()?.to_owned()))
        })
        .collect();
    let depth = |step: &Step| {
        let mut depth = 0;
        let mut at = step.value["envelope"]["event_id"].as_str().map(str::to_owned);
        while let Some(cause) = at.as_ref().and_then(|id| causes.get(id)) {
            depth += 1;
            at = Some(cause.clone());
            if depth > 64 {
                break;
            }
        }
        depth
    };
    steps.sort_by_cached_key(|s| (s.occurred_at, depth(s), s.appended_at, s.topic.clone(), s.offset));
}

/// The first offset at or after `since` (from the broker's time index), if any.
fn offset_at(
    consumer: &StreamConsumer,
    topic: &str,
    partition: i32,
    since: DateTime<Utc>,
) -> anyhow::Result<Option<i64>> {
    let mut query = TopicPartitionList::new();
    query.add_partition_offset(topic, partition, Offset::Offset(since.timestamp_millis()))?;
    let found = consumer.offsets_for_times(query, Duration::from_secs(10))?;
    Ok(found.find_partition(topic, partition).and_then(|p| match p.offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }))
}

/// Whether every partition's position has reached the end seen at start.
fn reached_ends(consumer: &StreamConsumer, ends: &BTreeMap<(String, i32), i64>) -> anyhow::Result<bool> {
    let positions = consumer.position()?;
    Ok(ends.iter().all(|((topic, partition), end)| {
        matches!(positions.find_partition(topic, *partition).map(|p| p.offset()), Some(Offset::Offset(at)) if at >= *end)
    }))
}

fn header<'m>(message: &'m BorrowedMessage<'_>, name: &str) -> Option<&'m [u8]> {
    message.headers()?.iter().find(|h| h.key == name).and_then(|h| h.value)
}

/// The record as a step of the story, if it carries `wanted`.
async fn step_of(codec: &Codec, message: &BorrowedMessage<'_>, wanted: &str, prefix: &str) -> Option<Step> {
    if let Some(correlation) = header(message, headers::CORRELATION_ID)
        && correlation != wanted.as_bytes()
    {
        return None;
    }
    let payload = message.payload()?;
    let at = Location::new(message.topic(), message.partition(), message.offset());
    let (_, value, schema) = codec.decode_value(&at, payload).await.ok()?;
    let value = value_to_json(&value, &schema);
    let envelope = &value["envelope"];
    if envelope["correlation_id"].as_str() != Some(wanted) {
        return None;
    }
    let trace_id = header(message, headers::TRACEPARENT)
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.split('-').nth(1))
        .map(str::to_owned);
    Some(Step {
        occurred_at: occurred_at(&envelope["occurred_at"]),
        topic: message.topic().strip_prefix(prefix).unwrap_or(message.topic()).to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        trace_id,
        appended_at: message.timestamp().to_millis().unwrap_or_default(),
        value,
    })
}

/// `occurred_at` as the JSON shape prints it (RFC 3339, or epoch millis).
fn occurred_at(value: &Json) -> i64 {
    match value {
        Json::Number(n) => n.as_i64().unwrap_or_default(),
        Json::String(text) => DateTime::parse_from_rfc3339(text).map(|t| t.timestamp_millis()).unwrap_or_default(),
        _ => 0,
    }
}

fn print_step(step: &Step, as_json: bool) {
    if as_json {
        let line = json!({
            "topic": step.topic,
            "partition": step.partition,
            "offset": step.offset,
            "key": step.key,
            "trace_id": step.trace_id,
            "value": step.value,
        });
        println!("{line}");
        return;
    }
    let time = DateTime::from_timestamp_millis(step.occurred_at)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
        .unwrap_or_default();
    let source = step.value["envelope"]["source"].as_str().unwrap_or_default();
    let service = source.strip_prefix("tributary.").unwrap_or(source);
    println!(
        "{time}  {service:<19}  {:<22}  {:<14}  {}{}",
        step.topic,
        step.key.as_deref().unwrap_or("-"),
        summary(&step.topic, &step.value),
        step.trace_id.as_deref().map(|t| format!("  trace={t}")).unwrap_or_default()
    );
}

fn text(value: &Json, field: &str) -> String {
    match &value[field] {
        Json::String(s) => s.clone(),
        Json::Null => String::new(),
        other => other.to_string(),
    }
}

/// What the record says, in one line.
fn summary(topic: &str, v: &Json) -> String {
    let t = |field: &str| text(v, field);
    if topic.ends_with(topics::DLQ_SUFFIX) {
        return "dead letter".into();
    }
    match topic {
        topics::USAGE_EVENTS => format!("usage {} {} {} ({})", t("meter"), t("quantity"), t("unit"), t("type")),
        topics::USAGE_RECORDED => format!(
            "total {} {} {}{}",
            t("meter"),
            t("total_quantity"),
            t("unit"),
            if v["is_final"] == true { ", final" } else { "" }
        ),
        topics::USAGE_THRESHOLDS => format!(
            "{} at {} %: {} of {} {}",
            t("meter"),
            t("threshold_percent"),
            t("used_quantity"),
            t("included_quantity"),
            t("unit")
        ),
        topics::USAGE_LATE => format!("late usage {}", t("reason")),
        topics::BILLING_CHARGES => {
            format!("charge {} {} for {} ({})", t("currency"), t("amount"), t("meter"), t("charge_id"))
        }
        topics::BILLING_INVOICES => {
            format!("invoice {} {} {} {}", t("invoice_id"), t("status"), t("currency"), t("total_amount"))
        }
        topics::BILLING_PAYMENTS => format!(
            "payment {} of {} {} {} (attempt {})",
            t("status"),
            t("invoice_id"),
            t("currency"),
            t("amount"),
            t("attempt_number")
        ),
        topics::ERP_POSTINGS => {
            format!("{} {} {} {}", t("document_type"), t("external_reference"), t("currency"), t("total_amount"))
        }
        topics::ERP_POSTING_RESULTS => {
            let number = t("erp_document_number");
            format!(
                "{} {}{}",
                t("status"),
                t("external_reference"),
                if number.is_empty() { String::new() } else { format!(", ERP number {number}") }
            )
        }
        topics::ENTITLEMENT_CHANGES => format!("{} -> {} ({})", t("from_state"), t("to_state"), t("reason")),
        topics::SUPPORT_CASES => format!("case {} {} {}", t("case_id"), t("action"), t("severity")),
        topics::SUPPORT_ACCOUNT_FLAGS => {
            let case = t("case_id");
            format!(
                "{} {}{}",
                t("action"),
                t("flag"),
                if case.is_empty() { String::new() } else { format!(" on case {case}") }
            )
        }
        topics::CRM_ACCOUNT_UPDATES => format!("{}: {}", t("kind"), t("summary")),
        topics::RENEWAL_NOTIFICATIONS => format!(
            "renewal in {} days, risk {} ({} signals)",
            t("days_until_renewal"),
            t("risk_level"),
            v["risk_signals"].as_array().map_or(0, Vec::len)
        ),
        topics::WEBHOOK_DELIVERIES => format!("webhook {} {}", t("endpoint"), t("outcome")),
        topics::ENTITLEMENT_OVERRIDES => {
            format!("override to {} by {}: {}", t("to_state"), t("requested_by"), t("reason"))
        }
        _ => String::new(),
    }
}
