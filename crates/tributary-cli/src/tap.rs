//! `tributary tap <topic>`: a topic as JSON lines, decoded through the registry.
//!
//! One line per record: topic, partition, offset, timestamp, key, schema id and value (and the
//! headers with `--headers`). Decimals print as exact strings. A record that does not decode
//! prints with an `error` field instead of a value: an operator sees every record, readable or
//! not. Reads `read_committed`, as every consumer of Tributary's topics should.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value as Json, json};
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::json::value_to_json;
use tributary_contracts::registry::{RegistryClient, RegistryResolver};
use tributary_runtime::kafka::{client_config, partitions_of, watermarks};

use crate::Connections;

/// How long without records before checking whether the end is reached.
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// `tributary tap` arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct TapArgs {
    /// The topic to read.
    topic: String,
    /// Start at the beginning of each partition instead of its end.
    #[arg(long)]
    from_beginning: bool,
    /// Keep reading new records instead of stopping at the end.
    #[arg(long)]
    follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    limit: Option<u64>,
    /// Only records with this key (the account id on event topics).
    #[arg(long)]
    key: Option<String>,
    /// Print each record's headers.
    #[arg(long)]
    headers: bool,
}

pub(crate) async fn run(connections: &Connections, args: &TapArgs) -> anyhow::Result<ExitCode> {
    let registry = &connections.registry;
    let client = RegistryClient::new(&registry.url, registry.username.as_deref(), registry.password.as_deref())?;
    let codec = Codec::new(Arc::new(RegistryResolver::new(client)));
    let consumer: StreamConsumer = client_config(&connections.kafka)
        .set("group.id", format!("tributary-tap-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .context("creating the consumer")?;

    let partitions = partitions_of(&consumer, &args.topic)?;
    anyhow::ensure!(!partitions.is_empty(), "topic {} does not exist", args.topic);

    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for &partition in &partitions {
        let (low, high) = watermarks(&consumer, &args.topic, partition)?;
        let start = if args.from_beginning { low } else { high };
        assignment.add_partition_offset(&args.topic, partition, Offset::Offset(start))?;
        ends.insert(partition, high);
    }
    consumer.assign(&assignment)?;

    let mut printed = 0_u64;
    loop {
        if args.limit.is_some_and(|limit| printed >= limit) {
            break;
        }
        if !args.follow && reached_end(&consumer, &args.topic, &ends)? {
            break;
        }
        let message = match tokio::time::timeout(IDLE_CHECK, consumer.recv()).await {
            Err(_) => continue,
            Ok(message) => message.context("consuming")?,
        };
        if let Some(wanted) = &args.key
            && message.key() != Some(wanted.as_bytes())
        {
            continue;
        }
        println!("{}", line(&codec, &message, args.headers).await);
        printed += 1;
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether every partition's position has reached the end seen at start.
fn reached_end(consumer: &StreamConsumer, topic: &str, ends: &BTreeMap<i32, i64>) -> anyhow::Result<bool> {
    let positions = consumer.position()?;
    Ok(ends.iter().all(|(&partition, &end)| {
        match positions.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(position)) => position >= end,
            // No position yet: nothing consumed; done only if the partition is empty.
            _ => end == 0 || ends.is_empty(),
        }
    }))
}

async fn line(codec: &Codec, message: &BorrowedMessage<'_>, with_headers: bool) -> Json {
    let at = Location::new(message.topic(), message.partition(), message.offset());
    let mut line = json!({
        "topic": message.topic(),
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": message.timestamp().to_millis(),
        "key": message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
    });
    match message.payload() {
        None => line["value"] = Json::Null,
        Some(payload) => match codec.decode_value(&at, payload).await {
            Ok((id, value, schema)) => {
                line["schema_id"] = json!(id);
                line["value"] = value_to_json(&value, &schema);
            }
            Err(error) => {
                line["error"] = json!(error.to_string());
                line["error_class"] = json!(error.class());
                line["raw"] = json!(base64::engine::general_purpose::STANDARD.encode(payload));
            }
        },
    }
    if with_headers {
        let headers: BTreeMap<String, Json> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.map_or(Json::Null, |v| json!(String::from_utf8_lossy(v)))))
                    .collect()
            })
            .unwrap_or_default();
        line["headers"] = json!(headers);
    }
    line
}
