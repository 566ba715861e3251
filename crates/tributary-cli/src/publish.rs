//! `tributary publish <topic>`: JSON lines into a topic, encoded through the registry.
//!
//! The input is a sequence of JSON values (JSON lines, or pretty-printed one after another),
//! each in the shape `tap` prints values (decimals as strings, times in RFC 3339 or epoch
//! milliseconds, dates as `YYYY-MM-DD`), or a whole `tap` line, whose `value` is taken:
//! a tap can be replayed into another topic or cluster. Envelope fields other than
//! `account_id` may be left out: a fresh event id, the current time, the event id as
//! correlation id and `tributary-cli` as source are filled in. The key is what the topic's
//! contract says: the account id on event topics, the entity id on refdata topics.
//!
//! Every record is checked and encoded before anything is written: one bad record (reported
//! with its number and field path) and nothing is published.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chrono::{SecondsFormat, Utc};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value as Json, json};
use tributary_contracts::codec::{Codec, reader_schema};
use tributary_contracts::json::json_to_value;
use tributary_contracts::registry::{RegistryClient, RegistryResolver};
use tributary_contracts::topics::{self, KeyKind, TopicSpec};
use tributary_runtime::kafka::producer_config;

use crate::Connections;

/// `tributary publish` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// The topic, with any prefix (e.g. `refdata.contracts` or `staging.refdata.contracts`).
    topic: String,
    /// A file of JSON values; standard input when absent or `-`.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Check and encode every record, write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The contract of `topic`: the longest contract topic name it ends with, and the prefix.
fn contract_of(topic: &str) -> Option<(&'static TopicSpec, &str)> {
    topics::ALL
        .iter()
        .filter(|spec| topic.ends_with(spec.name))
        .max_by_key(|spec| spec.name.len())
        .map(|spec| (spec, &topic[..topic.len() - spec.name.len()]))
}

/// Fills the envelope fields a person typing JSON should not have to invent.
fn complete_envelope(value: &mut Json) {
    let Some(object) = value.as_object_mut() else { return };
    let envelope = object.entry("envelope").or_insert_with(|| json!({}));
    let Some(envelope) = envelope.as_object_mut() else { return };
    let event_id = envelope.entry("event_id").or_insert_with(|| json!(uuid::Uuid::new_v4().to_string())).clone();
    envelope.entry("correlation_id").or_insert(event_id);
    envelope.entry("occurred_at").or_insert_with(|| json!(Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)));
    envelope.entry("source").or_insert_with(|| json!("tributary-cli"));
}

fn key_of(spec: &TopicSpec, value: &Json) -> Option<String> {
    let key = match spec.key {
        KeyKind::AccountId => &value["envelope"]["account_id"],
        KeyKind::EntityId(field) => &value[field],
    };
    key.as_str().map(str::to_owned)
}

pub(crate) async fn run(connections: &Connections, args: &PublishArgs) -> anyhow::Result<ExitCode> {
    let (spec, prefix) = contract_of(&args.topic)
        .with_context(|| format!("{} does not end with the name of a Tributary topic", args.topic))?;
    let schema = reader_schema(spec.name).context("the topic has no schema")?;
    let registry = &connections.registry;
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    let codec = Codec::new(Arc::new(RegistryResolver::new(client))).with_topic_prefix(prefix);

    let reader: Box<dyn std::io::Read> = match &args.file {
        Some(path) if path.as_os_str() != "-" => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?,
        )),
        _ => Box::new(std::io::stdin().lock()),
    };
    let mut records = Vec::new();
    for (index, parsed) in serde_json::Deserializer::from_reader(reader).into_iter::<Json>().enumerate() {
        let at = index + 1;
        let mut value = parsed.with_context(|| format!("record {at}: not JSON"))?;
        if value.get("topic").is_some() && value.get("value").is_some() {
            value = value["value"].take(); // a `tap` line
        }
        complete_envelope(&mut value);
        let key = key_of(spec, &value).with_context(|| format!("record {at}: no key ({:?})", spec.key))?;
        let avro = json_to_value(&value, schema).with_context(|| format!("record {at}"))?;
        let payload = codec.encode_value(spec.name, &avro).await.with_context(|| format!("record {at}"))?;
        records.push((key, payload));
    }
    if args.dry_run {
        println!("{} records checked for {}; nothing written (--dry-run)", records.len(), args.topic);
        return Ok(ExitCode::SUCCESS);
    }
    let producer: FutureProducer = producer_config(&connections.kafka)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating the producer")?;
    for (key, payload) in &records {
        producer
            .send(FutureRecord::to(&args.topic).key(key).payload(payload), Duration::from_secs(30))
            .await
            .map_err(|(error, _)| error)
            .with_context(|| format!("writing the record with key {key}"))?;
    }
    println!("{} records published to {}", records.len(), args.topic);
    Ok(ExitCode::SUCCESS)
}
