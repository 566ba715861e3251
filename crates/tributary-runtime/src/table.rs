//! Reference tables: a whole compacted refdata topic, held in memory by every instance.
//!
//! Master data (customers, contracts, price plans) is keyed by entity id, not by account, so it
//! cannot be co-partitioned with the event topics a service reads. Each instance therefore
//! reads every partition of the refdata topic from the beginning (a "global table" in Kafka
//! Streams terms), keeps the newest version of each entity, and keeps following the topic.
//! A service waits for [`ReferenceTable::caught_up`] before it processes its first event, so
//! that master data published before an event is always visible to it.
//!
//! The reader commits no offsets (it has no group to speak of): a restarted instance simply
//! reads the compacted topic again, which is what makes the table correct after a restart.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tributary_contracts::codec::{Codec, Location};
use tributary_contracts::{Contract, types};

use crate::config::KafkaConfig;
use crate::kafka::{client_config, ends_of, partitions_of, reached};

/// A refdata record: keyed, versioned, and marked when deleted at its source.
pub trait Reference: Contract + 'static {
    /// The entity id (the Kafka key).
    fn key(&self) -> &str;
    /// The revision from the system of record; a lower one never replaces a higher one.
    fn version(&self) -> i64;
    /// True when the entity was deleted at its source.
    fn is_deleted(&self) -> bool;
}

/// `Reference` for a refdata type whose entity id is `$id`; every refdata record carries
/// `version` and `deleted`.
macro_rules! reference {
    ($($ty:ident => $id:ident),* $(,)?) => {$(
        impl Reference for types::$ty {
            fn key(&self) -> &str {
                &self.$id
            }
            fn version(&self) -> i64 {
                self.version
            }
            fn is_deleted(&self) -> bool {
                self.deleted
            }
        }
    )*};
}

reference!(Contract => contract_id, Customer => customer_id, PricePlan => price_plan_id);

type Indexer<T> = Box<dyn Fn(&T) -> Vec<String> + Send + Sync>;

struct Rows<T> {
    by_key: HashMap<String, Arc<T>>,
    /// Highest version seen per key, deletions included, so that a late older revision
    /// cannot resurrect a deleted entity.
    versions: HashMap<String, i64>,
    by_index: HashMap<String, BTreeSet<String>>,
}

struct Shared<T> {
    rows: RwLock<Rows<T>>,
    index: Indexer<T>,
    caught_up: tokio::sync::watch::Sender<bool>,
    /// Live rows, for the service's metrics (an operator checks that master data is loaded).
    rows_gauge: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
}

/// The newest version of every entity of one refdata topic, with a secondary index.
pub struct ReferenceTable<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for ReferenceTable<T> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

impl<T> std::fmt::Debug for ReferenceTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rows = self.shared.rows.read().map(|rows| rows.by_key.len()).unwrap_or_default();
        f.debug_struct("ReferenceTable").field("rows", &rows).finish_non_exhaustive()
    }
}

impl<T: Reference> ReferenceTable<T> {
    /// An empty table whose rows are also found under the secondary keys `index` returns
    /// (e.g. a contract under its subscription id).
    pub fn new(index: impl Fn(&T) -> Vec<String> + Send + Sync + 'static) -> Self {
        let rows = Rows { by_key: HashMap::new(), versions: HashMap::new(), by_index: HashMap::new() };
        let (caught_up, _) = tokio::sync::watch::channel(false);
        let rows = RwLock::new(rows);
        Self { shared: Arc::new(Shared { rows, index: Box::new(index), caught_up, rows_gauge: Default::default() }) }
    }

    /// Keeps `gauge` at the number of live rows (set once; later calls are ignored).
    pub fn observe_rows(&self, gauge: prometheus_client::metrics::gauge::Gauge) {
        gauge.set(self.len() as i64);
        let _ = self.shared.rows_gauge.set(gauge);
    }

    /// Registers a gauge of the live rows as `name` in `registry` and keeps it current.
    pub fn register_rows(&self, registry: &mut prometheus_client::registry::Registry, name: &str, help: &str) {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(name, help, gauge.clone());
        self.observe_rows(gauge);
    }

    /// The entity `key`.
    pub fn get(&self, key: &str) -> Option<Arc<T>> {
        self.shared.rows.read().expect("table lock").by_key.get(key).cloned()
    }

    /// The entities found under the secondary key `index_key`.
    pub fn find(&self, index_key: &str) -> Vec<Arc<T>> {
        let rows = self.shared.rows.read().expect("table lock");
        rows.by_index
            .get(index_key)
            .map(|keys| keys.iter().filter_map(|key| rows.by_key.get(key).cloned()).collect())
            .unwrap_or_default()
    }

    /// Number of live entities.
    pub fn len(&self) -> usize {
        self.shared.rows.read().expect("table lock").by_key.len()
    }

    /// True when the table holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one record: a newer version replaces the row, a deleted one or a tombstone
    /// (`None`) removes it, an older version is ignored. Returns whether the table changed.
    pub fn apply(&self, key: &str, value: Option<T>) -> bool {
        let mut rows = self.shared.rows.write().expect("table lock");
        if let Some(value) = &value
            && rows.versions.get(key).is_some_and(|&seen| seen > value.version())
        {
            return false;
        }
        if let Some(old) = rows.by_key.remove(key) {
            for index_key in (self.shared.index)(&old) {
                if let Some(keys) = rows.by_index.get_mut(&index_key) {
                    keys.remove(key);
                    if keys.is_empty() {
                        rows.by_index.remove(&index_key);
                    }
                }
            }
        }
        match value {
            None => {
                rows.versions.remove(key);
            }
            Some(value) => {
                rows.versions.insert(key.to_owned(), value.version());
                if !value.is_deleted() {
                    for index_key in (self.shared.index)(&value) {
                        rows.by_index.entry(index_key).or_default().insert(key.to_owned());
                    }
                    rows.by_key.insert(key.to_owned(), Arc::new(value));
                }
            }
        }
        if let Some(gauge) = self.shared.rows_gauge.get() {
            gauge.set(rows.by_key.len() as i64);
        }
        true
    }

    /// Waits until the table holds everything the topic held when following began.
    pub async fn caught_up(&self) {
        let mut receiver = self.shared.caught_up.subscribe();
        let _ = receiver.wait_for(|caught_up| *caught_up).await;
    }

    /// Reads the topic of `T` from the beginning and keeps following it until `shutdown` (the
    /// stream runtime does this for the tables it is given, see [`FollowedTable`]).
    /// A record that cannot be decoded is logged with its location and skipped: refdata has
    /// a single writer per topic, and the table must keep serving the rows it has.
    async fn follow_topic(self, kafka: KafkaConfig, codec: Codec, shutdown: CancellationToken) -> anyhow::Result<()> {
        let topic = kafka.topic(T::TOPIC);
        let consumer: StreamConsumer = client_config(&kafka)
            .set("group.id", format!("tributary-table-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .context("creating the reference table consumer")?;
        let partitions = partitions_of(&consumer, &topic)?;
        anyhow::ensure!(!partitions.is_empty(), "reference topic {topic} has no partitions (does it exist?)");
        let ends = ends_of(&consumer, &topic, &partitions)?;
        let mut assignment = TopicPartitionList::new();
        for &partition in &partitions {
            assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let mut caught_up = ends.is_empty();
        if caught_up {
            self.shared.caught_up.send_replace(true);
        }
        tracing::info!(topic, partitions = partitions.len(), "following reference topic");
        loop {
            if !caught_up {
                caught_up = reached(&consumer, &topic, &ends)?;
                if caught_up {
                    tracing::info!(topic, rows = self.len(), "reference table caught up");
                    self.shared.caught_up.send_replace(true);
                }
            }
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                received = tokio::time::timeout(Duration::from_millis(200), consumer.recv()) => match received {
                    Err(_) => continue,
                    Ok(Err(error)) => {
                        tracing::warn!(topic, %error, "reference table consume error");
                        continue;
                    }
                    Ok(Ok(message)) => message,
                },
            };
            let Some(key) = message.key().map(|k| String::from_utf8_lossy(k).into_owned()) else {
                tracing::warn!(topic, offset = message.offset(), "reference record without a key skipped");
                continue;
            };
            let value = match message.payload() {
                None => None,
                Some(payload) => {
                    let at = Location::new(T::TOPIC, message.partition(), message.offset());
                    match codec.decode::<T>(&at, payload).await {
                        Ok(value) => Some(value),
                        Err(error) => {
                            tracing::error!(topic, %error, "undecodable reference record skipped");
                            continue;
                        }
                    }
                }
            };
            self.apply(&key, value);
        }
    }
}

/// A reference table as the stream runtime holds it: followed from the start of its topic,
/// waited for before the first record is processed.
pub trait FollowedTable: Send + Sync + 'static {
    /// The refdata topic (as the contracts name it).
    fn topic(&self) -> &'static str;
    /// Follows the topic until `shutdown`.
    fn follow(
        &self,
        kafka: KafkaConfig,
        codec: Codec,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, anyhow::Result<()>>;
    /// Resolves once the table has caught up with what its topic held when following began.
    fn caught_up(&self) -> BoxFuture<'static, ()>;
}

impl<T: Reference> FollowedTable for ReferenceTable<T> {
    fn topic(&self) -> &'static str {
        T::TOPIC
    }

    fn follow(
        &self,
        kafka: KafkaConfig,
        codec: Codec,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, anyhow::Result<()>> {
        Box::pin(self.clone().follow_topic(kafka, codec, shutdown))
    }

    fn caught_up(&self) -> BoxFuture<'static, ()> {
        let table = self.clone();
        Box::pin(async move { table.caught_up().await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_contracts::samples;

    fn contract(id: &str, subscription: &str, version: i64, deleted: bool) -> types::Contract {
        let mut contract: types::Contract = samples::typed(samples::Fill::Full, 1);
        contract.contract_id = id.into();
        contract.subscription_id = subscription.into();
        contract.version = version;
        contract.deleted = deleted;
        contract
    }

    fn by_subscription(contract: &types::Contract) -> Vec<String> {
        vec![contract.subscription_id.clone()]
    }

    #[test]
    fn a_newer_version_replaces_an_older_one_and_never_the_reverse() {
        let table = ReferenceTable::new(by_subscription);
        assert!(table.apply("c1", Some(contract("c1", "sub-a", 2, false))));
        assert!(!table.apply("c1", Some(contract("c1", "sub-b", 1, false))), "an older version is ignored");
        assert_eq!(table.get("c1").unwrap().subscription_id, "sub-a");
        assert!(table.apply("c1", Some(contract("c1", "sub-b", 3, false))));
        assert!(table.find("sub-a").is_empty(), "the index follows the new version");
        assert_eq!(table.find("sub-b").len(), 1);
    }

    #[test]
    fn a_deletion_or_a_tombstone_removes_the_row_and_its_index_entries() {
        let table = ReferenceTable::new(by_subscription);
        table.apply("c1", Some(contract("c1", "sub-a", 1, false)));
        table.apply("c1", Some(contract("c1", "sub-a", 2, true)));
        assert!(table.get("c1").is_none() && table.find("sub-a").is_empty());
        assert!(!table.apply("c1", Some(contract("c1", "sub-a", 1, false))), "no resurrection by an old version");
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        table.observe_rows(gauge.clone());
        table.apply("c2", Some(contract("c2", "sub-b", 1, false)));
        assert_eq!(gauge.get(), 1, "the gauge follows the live rows");
        table.apply("c2", None);
        assert!(table.is_empty());
        assert_eq!(gauge.get(), 0);
    }
}
