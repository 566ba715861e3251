//! Kafka client plumbing shared by the runtime and the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use crate::config::KafkaConfig;

/// A librdkafka configuration with the bootstrap servers and every pass-through property.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (key, value) in &kafka.properties {
        config.set(key, value);
    }
    config
}

/// Producer settings shared by the runtime, the tools and the tests.
pub fn producer_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut config = client_config(kafka);
    // The Java client's partitioner, so that platforms writing with Java and our services put
    // one account in the same partition number of every topic.
    config.set("partitioner", "murmur2_random");
    config.set("linger.ms", "5");
    config
}

/// The partition the Java client's default partitioner (and librdkafka's `murmur2_random`)
/// gives `key` among `partitions`: the positive murmur2 hash modulo the count.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) as i32 % partitions.max(1)
}

/// Kafka's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`), seed 0x9747b28c.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// Errors reaching the cluster.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// No broker answered a metadata request in time.
    #[error("no Kafka broker at {bootstrap} answered within {timeout:?}: {source}")]
    Unreachable {
        /// The bootstrap servers tried.
        bootstrap: String,
        /// How long we waited.
        timeout: Duration,
        /// The last error.
        source: rdkafka::error::KafkaError,
    },
    /// A client could not be created (a bad property).
    #[error("invalid Kafka client configuration: {0}")]
    Client(rdkafka::error::KafkaError),
    /// A topic could not be created.
    #[error("cannot create topic {topic}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// Why not.
        reason: String,
    },
    /// The blocking metadata task failed.
    #[error("metadata task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Waits until a broker answers a metadata request; returns how many brokers the cluster has.
pub async fn wait_for_broker(kafka: &KafkaConfig, timeout: Duration) -> Result<usize, KafkaSetupError> {
    let consumer: BaseConsumer = client_config(kafka).create().map_err(KafkaSetupError::Client)?;
    let bootstrap = kafka.bootstrap_servers.clone();
    // fetch_metadata blocks the calling thread, so it runs on the blocking pool.
    tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, timeout)
            .map(|metadata| metadata.brokers().len())
            .map_err(|source| KafkaSetupError::Unreachable { bootstrap, timeout, source })
    })
    .await?
}

/// What kind of topic to create: log-compacted state or a plain event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// An event topic with time retention.
    Events,
    /// A compacted topic that keeps the latest record per key (changelogs, reference data).
    Compacted,
    /// A compacted topic of one partition for a setting of the whole deployment (the
    /// controlled clock): one partition keeps its records in one order.
    Control,
}

/// Creates the topics that do not exist yet; existing ones are left as they are.
pub async fn ensure_topics(kafka: &KafkaConfig, topics: &[(&str, TopicKind)]) -> Result<(), KafkaSetupError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client_config(kafka).create().map_err(KafkaSetupError::Client)?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, kind)| {
            let partitions = if *kind == TopicKind::Control { 1 } else { kafka.partitions };
            let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(kafka.replication_factor));
            match kind {
                TopicKind::Events => topic,
                TopicKind::Compacted | TopicKind::Control => topic.set("cleanup.policy", "compact"),
            }
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &options)
        .await
        .map_err(|e| KafkaSetupError::CreateTopic { topic: "(batch)".into(), reason: e.to_string() })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaSetupError::CreateTopic { topic, reason: code.to_string() });
            }
        }
    }
    // A topic exists before its partitions have leaders; whoever reads or writes it right
    // after (the service, a test, the CLI) would get NotLeaderForPartition. Wait for them.
    let consumer: BaseConsumer = client_config(kafka).create().map_err(KafkaSetupError::Client)?;
    let names: Vec<String> = topics.iter().map(|(name, _)| (*name).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        for topic in &names {
            leaders_elected(&consumer, topic)
                .map_err(|e| KafkaSetupError::CreateTopic { topic: topic.clone(), reason: e.to_string() })?;
        }
        Ok(())
    })
    .await?
}

/// Blocks until every partition of `topic` answers a ListOffsets request, or METADATA_TIMEOUT
/// passes. Metadata naming a leader is not enough: with KRaft, the broker reports itself leader
/// before it has applied the change and created the partition's log, and answers
/// NotLeaderForPartition meanwhile.
fn leaders_elected<C: ConsumerContext>(consumer: &impl Consumer<C>, topic: &str) -> KafkaResult<()> {
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    loop {
        let partitions = partitions_of(consumer, topic)?;
        if !partitions.is_empty() {
            return ends_of(consumer, topic, &partitions).map(drop);
        }
        if std::time::Instant::now() >= deadline {
            return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::UnknownTopicOrPartition));
        }
        std::thread::sleep(SETTLE_PAUSE);
    }
}

/// Runs a metadata request again while it fails for a reason that passes on its own (a
/// partition whose leader is being elected, a topic that was just created), for at most
/// METADATA_TIMEOUT.
fn retrying_transient<T>(mut request: impl FnMut() -> KafkaResult<T>) -> KafkaResult<T> {
    let deadline = std::time::Instant::now() + METADATA_TIMEOUT;
    loop {
        match request() {
            Err(error) if is_transient(&error) && std::time::Instant::now() < deadline => {
                std::thread::sleep(SETTLE_PAUSE);
            }
            outcome => return outcome,
        }
    }
}

fn is_transient(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::NotCoordinator
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::OperationTimedOut
        )
    )
}

/// How long to wait between two tries of a metadata request that failed transiently.
const SETTLE_PAUSE: Duration = Duration::from_millis(100);

/// How long metadata and watermark requests may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

/// The partition ids of `topic` (none if it does not exist).
pub fn partitions_of<C: ConsumerContext>(consumer: &impl Consumer<C>, topic: &str) -> KafkaResult<Vec<i32>> {
    let metadata = retrying_transient(|| consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT))?;
    Ok(metadata.topics().first().map(|t| t.partitions().iter().map(|p| p.id()).collect()).unwrap_or_default())
}

/// The low and high watermarks of `partition` of `topic`, asked again while its leader is being
/// elected.
pub fn watermarks<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
) -> KafkaResult<(i64, i64)> {
    retrying_transient(|| consumer.fetch_watermarks(topic, partition, METADATA_TIMEOUT))
}

/// The high watermark of each of `partitions` of `topic` that holds records: the end a reader
/// has reached once its position is there.
pub(crate) fn ends_of<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partitions: &[i32],
) -> KafkaResult<BTreeMap<i32, i64>> {
    let mut ends = BTreeMap::new();
    for &partition in partitions {
        let (low, high) = watermarks(consumer, topic, partition)?;
        if high > low {
            ends.insert(partition, high);
        }
    }
    Ok(ends)
}

/// Whether `consumer`'s position is at or past `ends` on every partition. Positions pass
/// transaction markers, so an aborted tail does not stall a `read_committed` reader.
pub(crate) fn reached<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    ends: &BTreeMap<i32, i64>,
) -> KafkaResult<bool> {
    let positions = consumer.position()?;
    Ok(ends.iter().all(|(&p, &end)| {
        matches!(positions.find_partition(topic, p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= end)
    }))
}

/// Reads `topic` (or only `partitions` of it) from the beginning to its end as of the call,
/// `read_committed`, handing each record to `on_record`. The end is the high watermark seen at
/// the start; the position passes transaction markers, so aborted tails do not stall it.
pub async fn read_to_end(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: Option<&[i32]>,
    mut on_record: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<u64, rdkafka::error::KafkaError> {
    use rdkafka::TopicPartitionList;
    use rdkafka::consumer::StreamConsumer;
    const IDLE: Duration = Duration::from_millis(200);

    let consumer: StreamConsumer = client_config(kafka)
        .set("group.id", format!("tributary-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let wanted = match partitions {
        Some(partitions) => partitions.to_vec(),
        None => partitions_of(&consumer, topic)?,
    };
    let ends = ends_of(&consumer, topic, &wanted)?;
    if ends.is_empty() {
        return Ok(0);
    }
    let mut assignment = TopicPartitionList::new();
    for &partition in ends.keys() {
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let mut read = 0;
    loop {
        if reached(&consumer, topic, &ends)? {
            return Ok(read);
        }
        if let Ok(message) = tokio::time::timeout(IDLE, consumer.recv()).await {
            on_record(&message?);
            read += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Kafka's UtilsTest.testMurmur2.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            ("abc", 479_470_107),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()) as i32, expected, "{key}");
        }
        assert_eq!(partition_of(b"foobar", 3), (-790_332_482_i32 & 0x7fff_ffff) % 3);
    }
}
