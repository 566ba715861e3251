//! Producing inputs and reading outputs of the real broker, for tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::registry::{RegistryClient, RegistryResolver};
use tributary_contracts::types::{Envelope, UsageEvent};
use tributary_contracts::{Contract, Decimal6};
use tributary_runtime::kafka::producer_config;

use crate::Stack;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A codec through the stack's registry, for topics under `prefix`.
pub fn codec(stack: &Stack, prefix: &str) -> Codec {
    let client = RegistryClient::new(&stack.registry_url, None, None).expect("registry client");
    Codec::new(Arc::new(RegistryResolver::new(client))).with_topic_prefix(prefix)
}

/// A usage event from a test platform for `account`.
pub fn usage_event(account: &str) -> UsageEvent {
    let now = Utc::now();
    let envelope = Envelope::originating("test-platform", account, now);
    UsageEvent {
        id: envelope.event_id.clone(),
        source: "test-platform".into(),
        r#type: "api.call".into(),
        subject: account.into(),
        time: now.timestamp_millis(),
        data: "{}".into(),
        subscription_id: Some(format!("sub-{account}")),
        meter: Some("api_calls".into()),
        quantity: Some(Decimal6::from(1)),
        unit: Some("call".into()),
        dimensions: Default::default(),
        received_at: None,
        envelope,
    }
}

/// An idempotent producer (acks=all) with the Java partitioner, as platforms would use.
pub fn producer(stack: &Stack) -> FutureProducer {
    producer_config(&stack.kafka()).set("enable.idempotence", "true").set("acks", "all").create().expect("producer")
}

/// Writes `values` to `topic`, keyed by their account ids, in order.
pub async fn produce<T: Contract>(producer: &FutureProducer, codec: &Codec, topic: &str, values: &[T]) {
    produce_keyed(producer, codec, topic, &by_account(values)).await;
}

/// `values` keyed by their account ids, as event topics are.
pub fn by_account<T: Contract>(values: &[T]) -> Vec<(String, T)> {
    values.iter().map(|v| (v.envelope().account_id.clone(), v.clone())).collect()
}

/// Writes `values` to `topic` in the background, `chunk` records at a time with `pause` between
/// chunks: traffic that keeps flowing while a test kills or stops the service under it.
pub fn trickle<T: Contract + 'static>(
    stack: &'static Stack,
    codec: Codec,
    topic: String,
    values: Vec<(String, T)>,
    chunk: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let producer = producer(stack);
        for chunk in values.chunks(chunk) {
            produce_keyed(&producer, &codec, &topic, chunk).await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Writes `values` to `topic` under the given keys, all in flight at once (the idempotent
/// producer keeps their order per partition); for bulk loads.
pub async fn produce_keyed<T: Contract>(producer: &FutureProducer, codec: &Codec, topic: &str, values: &[(String, T)]) {
    let mut payloads = Vec::with_capacity(values.len());
    for (key, value) in values {
        payloads.push((key, codec.encode(value).await.expect("encode")));
    }
    for chunk in payloads.chunks(5_000) {
        let sends = chunk.iter().map(|(key, payload)| {
            producer.send(FutureRecord::to(topic).key(key.as_str()).payload(payload.as_slice()), TIMEOUT)
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(error, _)| error).expect("produce");
        }
    }
}

/// Writes `values` to `topic`, keyed by their account ids, each value in a transaction of its
/// own, as another exactly-once service would: every record is followed by a commit marker,
/// an offset that no consumer receives.
pub async fn produce_transactionally<T: Contract>(stack: &Stack, codec: &Codec, topic: &str, values: &[T]) {
    let producer: FutureProducer = producer_config(&stack.kafka())
        .set("transactional.id", crate::unique_name("test-txn"))
        .create()
        .expect("transactional producer");
    producer.init_transactions(TIMEOUT).expect("init transactions");
    for (key, value) in by_account(values) {
        let payload = codec.encode(&value).await.expect("encode");
        producer.begin_transaction().expect("begin");
        producer
            .send(FutureRecord::to(topic).key(key.as_str()).payload(payload.as_slice()), TIMEOUT)
            .await
            .map_err(|(error, _)| error)
            .expect("produce");
        producer.commit_transaction(TIMEOUT).expect("commit");
    }
}

/// Writes raw bytes to `topic` under `key`.
pub async fn produce_raw(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) {
    producer
        .send(FutureRecord::to(topic).key(key).payload(payload), TIMEOUT)
        .await
        .map_err(|(error, _)| error)
        .expect("produce");
}

/// A record read back.
#[derive(Debug, Clone)]
pub struct Read<T> {
    /// Where it was.
    pub location: Location,
    /// Its key.
    pub key: Option<String>,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// Its raw value.
    pub payload: Option<Vec<u8>>,
    /// Its decoded value, if it decodes as `T`.
    pub value: Option<T>,
}

/// Every committed record of `topic` from the beginning to the end as of now, decoded as `T`
/// where possible. Call it when the writers have stopped, so that "the end" is final.
pub async fn read_to_end<T: Contract>(stack: &Stack, codec: &Codec, topic: &str) -> Vec<Read<T>> {
    let mut raw = Vec::new();
    tributary_runtime::kafka::read_to_end(&stack.kafka(), topic, None, |message| {
        let headers = message
            .headers()
            .map(|h| {
                h.iter()
                    .filter_map(|h| Some((h.key.to_owned(), String::from_utf8_lossy(h.value?).into_owned())))
                    .collect()
            })
            .unwrap_or_default();
        raw.push(Read::<T> {
            location: Location::new(topic, message.partition(), message.offset()),
            key: message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: message.payload().map(<[u8]>::to_vec),
            value: None,
        });
    })
    .await
    .expect("read the topic to its end");
    for record in &mut raw {
        if let Some(payload) = &record.payload {
            let logical = Location::new(T::TOPIC, record.location.partition, record.location.offset);
            record.value = codec.decode::<T>(&logical, payload).await.ok();
        }
    }
    raw
}

/// Writes `value` to `topic` with extra `headers`.
pub async fn produce_with_headers<T: Contract>(
    producer: &FutureProducer,
    codec: &Codec,
    topic: &str,
    value: &T,
    headers: &[(&str, &str)],
) {
    use rdkafka::message::{Header, OwnedHeaders};
    let payload = codec.encode(value).await.expect("encode");
    let key = value.envelope().account_id.clone();
    let mut owned = OwnedHeaders::new();
    for (name, text) in headers {
        owned = owned.insert(Header { key: name, value: Some(*text) });
    }
    producer
        .send(FutureRecord::to(topic).key(&key).payload(&payload).headers(owned), TIMEOUT)
        .await
        .map_err(|(error, _)| error)
        .expect("produce");
}
